"""The "hardest examples" report: which training images pull hardest on the weights, and how noisy the gradient is.

Two pictures, each rendered from plain arrays (no storage, no Prefect) to PNG bytes:
- `render_hardest`: a grid of the training images with the highest mean per-example
  gradient norm over an epoch, each with its label, the trained model's prediction
  (in red when wrong) and that mean norm;
- `render_noise_scale`: the simple noise scale B_simple per step (raw, faint) and
  smoothed, with the batch size used as a horizontal line.

`hardest_examples` and `noise_history` gather their inputs for a run; `write_hardest_report`
renders both beside the run's other files. PNGs are written as 64-colour palette images:
text and grey tiles lose nothing visible, and the files stay in the tens of KB.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tapeline import reader
from tapeline.errors import TapelineError
from tapeline.gradients.noise import DECAY, smoothed_noise_scale
from tapeline.storage.root import Storage

HARDEST = 32  # tiles in the grid
COLUMNS = 8
WRONG = "#c62828"  # a wrong prediction: its text and its tile's frame
PALETTE_COLOURS = 64


class HardestReportError(TapelineError):
    """The inputs of the hardest-examples report do not fit together."""


@dataclass(frozen=True)
class HardestExamples:
    """The top-ranked training examples of a run, in rank order, and what the trained model predicts for them."""

    sample_ids: np.ndarray  # int64 [n]
    images: np.ndarray  # uint8 [n, 28, 28]
    labels: np.ndarray  # [n] class indices
    predictions: np.ndarray  # [n] class indices, the trained model's argmax
    mean_norms: np.ndarray  # [n] mean per-example gradient norm over the epoch
    classes: tuple[str, ...]


@dataclass(frozen=True)
class HardestReport:
    grid: PurePath  # the hardest examples' PNG, under the run
    noise: PurePath  # the noise scale plot's PNG, under the run
    grid_png: bytes
    noise_png: bytes
    examples: HardestExamples
    batch_size: int
    noise_scale: float  # the smoothed B_simple at the last step (NaN if it never had a positive value)


def render_hardest(
    images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, mean_norms: np.ndarray, classes, title: str = ""
) -> bytes:
    """A grid of `images` (uint8 [n, 28, 28], in rank order), each titled with its label, prediction and mean norm."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    count = len(images)
    if images.ndim != 3 or not count or not (len(labels) == len(predictions) == len(mean_norms) == count):
        raise HardestReportError(
            f"hardest examples: {images.shape} images need as many labels, predictions and norms, "
            f"got {len(labels)}, {len(predictions)} and {len(mean_norms)}"
        )
    plt = _pyplot()
    columns = min(COLUMNS, count)
    rows = math.ceil(count / columns)
    # In inches: square tiles 1 wide, a gap above each for its three lines of text, room for the title and the key.
    tile, gap, top, bottom = 1.0, 0.5, 0.78, 0.28
    width = tile * (columns + (columns - 1) * 0.12) + 0.2
    height = tile * rows + gap * (rows - 1) + top + bottom
    figure, axes = plt.subplots(rows, columns, figsize=(width, height), dpi=90, squeeze=False)
    figure.subplots_adjust(
        left=0.1 / width, right=1 - 0.1 / width, top=1 - top / height, bottom=bottom / height, wspace=0.12, hspace=gap / tile
    )
    for index, axis in enumerate(axes.flat):
        axis.set_axis_off()
        if index >= count:
            continue
        label, predicted = int(labels[index]), int(predictions[index])
        wrong = label != predicted
        axis.imshow(images[index], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        if wrong:  # a frame, not only coloured text: visible at a glance, and without colour vision
            axis.set_axis_on()
            axis.set_xticks([]), axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set(color=WRONG, linewidth=2.5)
        axis.set_title(
            f"{classes[label]}\npred: {classes[predicted]}\n‖g‖ {mean_norms[index]:.3g}",
            fontsize=7, linespacing=1.2, color=WRONG if wrong else "black",
        )  # fmt: skip
    figure.suptitle(title or f"{count} hardest training examples", fontsize=9)
    figure.text(
        0.5, 0.005, "each tile: its label / the trained model's prediction (red and framed: wrong) / its mean gradient norm",
        ha="center", va="bottom", fontsize=7, color="#555555",
    )  # fmt: skip
    return _png(figure)


def render_noise_scale(
    steps: np.ndarray,
    noise_scale: np.ndarray,
    grad_variance: np.ndarray,
    grad_signal: np.ndarray,
    batch_size: int,
    title: str = "",
    decay: float = DECAY,
) -> bytes:
    """B_simple per step, raw (faint) and smoothed, on a log axis, with the batch size used as a horizontal line.

    Raw values that are not positive or not finite (the estimate's numerator or denominator can dip below zero)
    cannot sit on a log axis: they are left out, and the legend says how many."""
    steps, raw = np.asarray(steps), np.asarray(noise_scale, np.float64)
    if not (len(steps) == len(raw) == len(grad_variance) == len(grad_signal)) or not len(steps):
        raise HardestReportError(
            f"noise scale: {len(steps)} steps need as many values, got {len(raw)}, {len(grad_variance)} and {len(grad_signal)}"
        )
    smoothed = smoothed_noise_scale(grad_variance, grad_signal, decay)
    shown = np.isfinite(raw) & (raw > 0)
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 3.4), dpi=90)
    axes.plot(steps[shown], raw[shown], ".", markersize=1.5, color="#7aa6d6", alpha=0.5,
              label=f"B_simple per step ({np.count_nonzero(~shown)} of {len(raw)} ≤ 0 or NaN not shown)")  # fmt: skip
    axes.plot(steps, smoothed, color="#0b4f9c", linewidth=1.6, label=f"smoothed: EMA(tr Σ) / EMA(|G|²), decay {decay:g}")
    axes.axhline(batch_size, color="#d95f02", linestyle="--", linewidth=1.2, label=f"batch size used: {batch_size}")
    if shown.any() or np.isfinite(smoothed).any():
        axes.set_yscale("log")
    if len(steps) > 1:
        axes.set_xlim(steps[0], steps[-1])  # the steps', even when no value is shown
    axes.set(xlabel="step", ylabel="noise scale (examples)", title=title or "Gradient noise scale B_simple")
    axes.title.set_fontsize(9)
    axes.legend(fontsize=7, loc="best")
    axes.grid(True, which="major", linewidth=0.4, alpha=0.5)
    figure.tight_layout()
    return _png(figure)


def hardest_examples(run: str | Path, train_uri: str, model_path: Path, classes, top: int = HARDEST) -> HardestExamples:
    """The `top` examples of the run's last epoch by mean per-example gradient norm: their images from the training
    split, and what the run's trained model predicts for them."""
    from tapeline.evaluation import predict_classes  # TensorFlow: imported only when a report is made

    ranking = reader.rank_samples(run, top=top)
    sample_ids = ranking.column("sample_id").to_numpy()
    images = split_images(train_uri, sample_ids)
    return HardestExamples(
        sample_ids=sample_ids,
        images=images,
        labels=ranking.column("label").to_numpy(),
        predictions=predict_classes(model_path, images),
        mean_norms=ranking.column("mean_grad_norm").to_numpy(),
        classes=tuple(classes),
    )


def split_images(uri: str, sample_ids: np.ndarray) -> np.ndarray:
    """The images (uint8 [n, 28, 28, 1]) of some `sample_id`s of a split file, in the order asked; only their rows are read."""
    table = pq.read_table(uri, columns=["sample_id", "image"], filters=pc.field("sample_id").isin(sample_ids))
    found = table.column("sample_id").to_numpy()
    missing = np.setdiff1d(sample_ids, found)
    if missing.size:
        raise HardestReportError(f"{uri} has no sample_id {missing[:5].tolist()}: is it the split the run trained on?")
    images = table.column("image").combine_chunks().to_numpy_ndarray()
    order = np.argsort(found)  # the file's order, by sample_id, whatever the ranking's
    return images[order[np.searchsorted(found[order], sample_ids)]]


def noise_history(run: str | Path) -> dict[str, np.ndarray]:
    """Per step: `step`, `grad_noise_scale`, `grad_variance`, `grad_signal`, and `batch_size`, the size of the run's
    full batches (the longest `sample_ids` of a step: a last batch can be shorter)."""
    columns = ["step", "grad_noise_scale", "grad_variance", "grad_signal"]
    table = reader.read_steps(run, columns=[*columns, "sample_ids"]).sort_by("step")
    history = {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}
    history["batch_size"] = int(pc.max(pc.list_value_length(table.column("sample_ids"))).as_py() or 0)
    return history


def write_hardest_report(storage: Storage, run_id: str, train_uri: str, classes, top: int = HARDEST) -> HardestReport:
    """Render both pictures for a run whose samples and model are written, save them under the run, say where."""
    run = storage.layout.run(run_id)
    examples = hardest_examples(storage.uri_of(run.directory), train_uri, storage.fetch(run.model), classes, top)
    wrong = int(np.count_nonzero(examples.labels != examples.predictions))
    grid = render_hardest(
        examples.images, examples.labels, examples.predictions, examples.mean_norms, examples.classes,
        title=f"Run {run_id}: the {len(examples.images)} training examples with the highest mean gradient norm "
        f"in the last epoch ({wrong} predicted wrongly)",
    )  # fmt: skip
    history = noise_history(storage.uri_of(run.directory))
    noise = render_noise_scale(
        history["step"], history["grad_noise_scale"], history["grad_variance"], history["grad_signal"],
        history["batch_size"], title=f"Gradient noise scale B_simple, run {run_id}",
    )  # fmt: skip
    for path, png in ((run.hardest_plot, grid), (run.noise_plot, noise)):
        with storage.atomic(path) as temporary:
            temporary.write_bytes(png)
    smoothed = smoothed_noise_scale(history["grad_variance"], history["grad_signal"])
    return HardestReport(run.hardest_plot, run.noise_plot, grid, noise, examples, history["batch_size"], float(smoothed[-1]))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    from matplotlib import pyplot

    return pyplot


def _png(figure) -> bytes:
    """The figure as a palette PNG (see the module's docstring), and the figure closed."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _pyplot().close(figure)
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").quantize(PALETTE_COLOURS)
    buffer = io.BytesIO()
    image.save(buffer, format="png", optimize=True)
    return buffer.getvalue()
