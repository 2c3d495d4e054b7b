"""The "hardest examples" report: which training images pull hardest on the weights.

`render_hardest` draws, from plain arrays (no storage, no Prefect) to PNG bytes, a grid
of the training images with the highest mean per-example gradient norm over an epoch,
each with its label, its prediction and that mean norm. The prediction is the one
`tapeline samples` shows: the model's class for the example at its latest step of the
epoch (the samples dataset's `predicted`, before that step's update), not the final
model's, so the grid needs neither the model nor TensorFlow.

`hardest_examples` gathers the inputs for a run; `write_hardest_report` renders the
grid and saves it beside the run's other files (a palette PNG: plotting.py).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import ImageColor

from tapeline import reader
from tapeline.errors import TapelineError
from tapeline.gradients.plotting import palette_png, pyplot, save_png
from tapeline.storage.root import Storage

HARDEST = 32  # tiles in the grid
COLUMNS = 8
WRONG = "#c62828"  # a wrong prediction: its text and its tile's frame
FRAME = 3  # the frame's width, in pixels
DPI = 90  # a tile is DPI pixels wide
TEXT_PAD = 6 / 72  # inches between a tile's text and the tile (6 points)
UNKNOWN = -1  # a prediction the run did not record (samples written before the `predicted` column)


class HardestReportError(TapelineError):
    """The inputs of the hardest-examples report do not fit together."""


@dataclass(frozen=True)
class HardestExamples:
    """The top-ranked training examples of one epoch of a run, in rank order (reader.rank_samples), with their images."""

    epoch: int
    sample_ids: np.ndarray  # int64 [n]
    images: np.ndarray  # uint8 [n, height, width, channels]
    labels: np.ndarray  # [n] class indices
    predictions: np.ndarray  # [n] class indices predicted at each example's latest step of the epoch (UNKNOWN: not recorded)
    latest_steps: np.ndarray  # [n] that step
    mean_norms: np.ndarray  # [n] mean per-example gradient norm over the epoch
    classes: tuple[str, ...]

    def predicted_name(self, index: int) -> str:
        predicted = int(self.predictions[index])
        return self.classes[predicted] if predicted != UNKNOWN else "?"

    @property
    def wrong(self) -> int:
        """How many were predicted wrongly (UNKNOWN: a wrong prediction the run did not record)."""
        return int(np.count_nonzero(self.labels != self.predictions))


@dataclass(frozen=True)
class HardestReport:
    grid: PurePath  # the PNG, under the run
    grid_png: bytes
    examples: HardestExamples


NORM_KEY = "each tile: its label / the model's prediction at its latest step of the epoch (red and framed: wrong) / its mean gradient norm"


def render_hardest(
    images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, mean_norms: np.ndarray, classes, title: str = "",
    value_name: str = "‖g‖", key: str = NORM_KEY,
) -> bytes:  # fmt: skip
    """A grid of `images` (uint8 [n, height, width] or [n, height, width, 1 or 3], in rank order), each titled with
    its label, prediction and mean norm (or another value per image: `value_name` on the tile, `key` says what the
    tiles show): grey images dark on light, colour images as they are."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    count = len(images)
    shaped = images.ndim == 3 or images.ndim == 4 and images.shape[-1] == 3
    if not shaped or not count or not (len(labels) == len(predictions) == len(mean_norms) == count):
        raise HardestReportError(
            f"hardest examples: {images.shape} images need as many labels, predictions and norms, got {len(labels)}, {len(predictions)} and {len(mean_norms)}"
        )
    columns = min(COLUMNS, count)
    rows = math.ceil(count / columns)
    # In inches: square tiles 1 wide, a gap above each for its three lines of text, room for the title and the key.
    tile, space, gap, top, bottom, margin = 1.0, 0.12, 0.5, 0.78, 0.28, 0.1
    width = columns * (tile + space) - space + 2 * margin
    # The title (9 points) and the key (7 points) wrapped to the width: a character about 0.075 and 0.06 inch wide.
    title_lines, key_lines = textwrap.wrap(title or f"{count} hardest training examples", int(width / 0.075)), textwrap.wrap(key, int(width / 0.06))
    top, bottom = top + (len(title_lines) - 1) * 0.16, bottom + (len(key_lines) - 1) * 0.13
    height = rows * (tile + gap) - gap + top + bottom
    figure = pyplot().figure(figsize=(width, height), dpi=DPI)
    # One image of the whole figure, the tiles pasted in, and text: no axes, whose ticks and layout would cost most.
    pixels = np.full((math.ceil(height * DPI), math.ceil(width * DPI), 3), 255, np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        left, upper = margin + column * (tile + space), top + row * (tile + gap)  # from the figure's top left
        label, predicted = int(labels[index]), int(predictions[index])
        wrong = label != predicted  # UNKNOWN only where the run recorded a wrong prediction
        # A frame, not only coloured text: visible at a glance, and without colour vision.
        paste(pixels, as_rgb(images[index]), round(upper * DPI), round(left * DPI), round(tile * DPI), framed=wrong)
        figure.text(
            left + tile / 2, height - upper + TEXT_PAD, transform=figure.dpi_scale_trans, ha="center", va="bottom", fontsize=7, linespacing=1.2,
            s=f"{classes[label]}\npred: {classes[predicted] if predicted != UNKNOWN else '?'}\n{value_name} {mean_norms[index]:.3g}",
            color=WRONG if wrong else "black",
        )  # fmt: skip
    figure.figimage(pixels, origin="upper")
    figure.suptitle("\n".join(title_lines), fontsize=9, y=1 - space / height)  # a fixed gap above it, at any size
    figure.text(0.5, 0.005, "\n".join(key_lines), ha="center", va="bottom", fontsize=7, color="#555555")
    return palette_png(figure)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A tile's pixels: a grey image dark on light (its values inverted), a colour image as it is."""
    return np.repeat(255 - image[..., None], 3, axis=2) if image.ndim == 2 else image


def paste(pixels: np.ndarray, image: np.ndarray, top: int, left: int, size: int, framed: bool) -> None:
    """`image` scaled (nearest pixel, its aspect kept) into the `size`-pixel square at (top, left) of `pixels`, centred;
    with `framed`, a WRONG frame of FRAME pixels just outside it."""
    scale = size / max(image.shape[:2])
    height, width = round(image.shape[0] * scale), round(image.shape[1] * scale)
    top, left = top + (size - height) // 2, left + (size - width) // 2
    if framed:
        pixels[top - FRAME : top + height + FRAME, left - FRAME : left + width + FRAME] = ImageColor.getrgb(WRONG)
    rows, columns = np.arange(height) * image.shape[0] // height, np.arange(width) * image.shape[1] // width
    pixels[top : top + height, left : left + width] = image[rows[:, None], columns[None, :]]


def hardest_examples(run: str | Path, train_uri: str, classes, top: int = HARDEST, epoch: int | None = None) -> HardestExamples:
    """The `top` examples of an epoch (default: the run's last) by mean per-example gradient norm, their images from
    the training split, and what the model predicted for each at its latest step of the epoch."""
    epoch = reader.last_epoch(run) if epoch is None else epoch
    ranking = reader.rank_samples(run, epoch, top=top)
    sample_ids = ranking.column("sample_id").to_numpy()
    labels = ranking.column("label").to_numpy()
    wrong = ~ranking.column("latest_correct").to_numpy(zero_copy_only=False)
    recorded = pc.fill_null(pc.cast(ranking.column("latest_predicted"), "int16"), UNKNOWN).to_numpy()
    return HardestExamples(
        epoch=epoch,
        sample_ids=sample_ids,
        images=split_images(train_uri, sample_ids),
        labels=labels,
        predictions=np.where((recorded == UNKNOWN) & ~wrong, labels, recorded),  # right and not recorded: the label
        latest_steps=ranking.column("latest_step").to_numpy(),
        mean_norms=ranking.column("mean_grad_norm").to_numpy(),
        classes=tuple(classes),
    )


def split_images(uri: str, sample_ids: np.ndarray) -> np.ndarray:
    """The images (uint8 [n, height, width, channels]) of some `sample_id`s of a split file, in the order asked; only their rows are read."""
    table = pq.read_table(uri, columns=["sample_id", "image"], filters=pc.field("sample_id").isin(sample_ids))
    found = table.column("sample_id").to_numpy()
    missing = np.setdiff1d(sample_ids, found)
    if missing.size:
        raise HardestReportError(f"{uri} has no sample_id {missing[:5].tolist()}: is it the split the run trained on?")
    images = table.column("image").combine_chunks().to_numpy_ndarray()
    order = np.argsort(found)  # the file's order, by sample_id, whatever the ranking's
    return images[order[np.searchsorted(found[order], sample_ids)]]


def write_hardest_report(storage: Storage, run_id: str, train_uri: str, classes, top: int = HARDEST) -> HardestReport:
    """Render the grid for a run whose samples are written, save it under the run, say where."""
    run = storage.layout.run(run_id)
    examples = hardest_examples(storage.uri_of(run.directory), train_uri, classes, top)
    grid = render_hardest(
        examples.images, examples.labels, examples.predictions, examples.mean_norms, examples.classes,
        title=f"Run {run_id}: the {len(examples.images)} training examples with the highest mean gradient norm "
        f"in epoch {examples.epoch} ({examples.wrong} predicted wrongly at their latest step)",
    )  # fmt: skip
    save_png(storage, run.hardest_plot, grid)
    return HardestReport(run.hardest_plot, grid, examples)
