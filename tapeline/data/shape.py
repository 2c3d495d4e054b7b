"""What the data gives the model: the one record of the images' shape and the classes, sized from the data itself.

Recorded with the prepared splits (their manifest) and carried by `PreparedData`, as
nanoGPT's `meta.pkl` sizes its model: the model's input and output, the compiled step's
signature and the model card all come from here, never from constants.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataShape:
    """Images of `image_shape` (height, width, channels), uint8; labels 0 to `num_classes` - 1, named by `classes`."""

    image_shape: tuple[int, int, int]
    classes: tuple[str, ...]  # one name per label, in label order: the model's output order

    def __post_init__(self):
        object.__setattr__(self, "image_shape", tuple(int(n) for n in self.image_shape))
        object.__setattr__(self, "classes", tuple(str(name) for name in self.classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        return {"image_shape": list(self.image_shape), "classes": list(self.classes)}

    @classmethod
    def from_json(cls, record: dict) -> DataShape:
        return cls(tuple(record["image_shape"]), tuple(record["classes"]))
