"""What the reports' pictures share: matplotlib without a display, and figures saved as small palette PNGs.

A report's PNG is embedded in a Prefect artifact (base64, in the API's database) and kept
under the run: it is written as a 64-colour palette image, in which text, lines and
grey tiles lose nothing visible and the file stays in the tens of KB.
"""

from __future__ import annotations

import io
from pathlib import PurePath

import numpy as np

from tapeline.storage.root import Storage

PALETTE_COLOURS = 64
# Okabe and Ito's colour-blind-safe set, one colour per line that must be told apart, in an order where neighbours
# differ most: yellow left out (faint on white), vermillion last (beside orange, it looks alike).
DISTINCT = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#000000", "#56B4E9", "#D55E00")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    from matplotlib import pyplot

    return pyplot


def palette_png(figure) -> bytes:
    """The figure as a palette PNG (see the module's docstring), and the figure closed.

    Drawn once, to its pixel buffer rather than to an intermediate PNG; reduced to the palette by the fast octree
    method, whose error on these pictures is invisible and which is far quicker than the default median cut
    (docs/performance.md)."""
    from PIL import Image

    figure.canvas.draw()
    image = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")
    pyplot().close(figure)
    buffer = io.BytesIO()
    image.quantize(PALETTE_COLOURS, method=Image.Quantize.FASTOCTREE).save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def save_png(storage: Storage, path: PurePath, png: bytes) -> None:
    """A report's PNG under its run, whole or not at all."""
    with storage.atomic(path) as temporary:
        temporary.write_bytes(png)
