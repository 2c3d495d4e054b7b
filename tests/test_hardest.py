"""The hardest-examples and noise-scale reports: their pictures (real PNGs, small, one tile per example, wrong ones
framed in red; the noise scale's three statistics), the split's images by sample_id, and both artifacts, each of its
own, through a real Prefect API."""

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image
from prefect import flow, get_client
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from tapeline.data.idx import read_idx_gz
from tapeline.data.registry import FASHION_MNIST
from tapeline.data.shape import DataShape
from tapeline.data.splits import split_table
from tapeline.gradients.export import render_norms
from tapeline.gradients.hardest import (
    UNKNOWN,
    HardestExamples,
    HardestReport,
    HardestReportError,
    render_hardest,
    split_images,
)
from tapeline.gradients.noise import NOISE_SCALE_METRIC, smoothed_noise_scale
from tapeline.gradients.noise_report import MEDIAN, NoiseHistory, NoiseReport, NoiseReportError, render_noise_scale
from tapeline.gradients.plotting import DISTINCT
from tapeline.storage.root import Storage
from tapeline.tasks.export import hardest_markdown, noise_markdown

SMALL = 100_000  # bytes: "tens of KB, not hundreds"


@pytest.fixture(scope="module")
def fashion(fashion_mnist_dir) -> tuple[np.ndarray, np.ndarray]:
    """The first 32 real Fashion-MNIST training images and labels."""
    images = read_idx_gz(fashion_mnist_dir / "train-images-idx3-ubyte.gz", ndim=3)[:32]
    return images, read_idx_gz(fashion_mnist_dir / "train-labels-idx1-ubyte.gz", ndim=1)[:32]


def wrong_every_fifth(labels: np.ndarray) -> np.ndarray:
    predictions = labels.copy()
    predictions[::5] = (labels[::5] + 1) % 10
    return predictions


def decode(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def tiles(pixels: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The solid black squares of a grid whose images are all 255 (black): (top, bottom, left, right) each."""
    black = (pixels < 40).all(axis=2)
    found = []
    for top, bottom in runs(black.sum(axis=1) > 40):  # rows crossing tiles: text rows have far fewer black pixels
        if bottom - top < 40:
            continue  # a line of text
        for left, right in runs(black[top:bottom].mean(axis=0) > 0.9):
            if right - left >= 40:
                found.append((top, bottom, left, right))
    return found


def framed_in_red(pixels: np.ndarray, tile: tuple[int, int, int, int]) -> bool:
    """Each side of the tile has a red line within a few pixels of its edge (the frame overlaps the tile's border)."""
    top, bottom, left, right = tile
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
    middle_rows, middle_columns = slice(top + 10, bottom - 10), slice(left + 10, right - 10)
    sides = [red[edge - 4 : edge + 4, middle_columns].mean(axis=1) for edge in (top, bottom)]
    sides += [red[middle_rows, edge - 4 : edge + 4].mean(axis=0) for edge in (left, right)]
    return all(side.max() > 0.9 for side in sides)


@pytest.mark.parametrize("count", [32, 13])
def test_the_grid_has_a_tile_per_example_and_frames_the_wrong_ones_in_red(count):
    labels = np.arange(count) % 10
    predictions = wrong_every_fifth(labels)
    images = np.full((count, 28, 28), 255, np.uint8)
    png = render_hardest(images, labels, predictions, np.linspace(9, 1, count), FASHION_MNIST.classes)
    pixels = decode(png)
    found = tiles(pixels)
    assert len(found) == count
    ordered = sorted(found)  # rank order: row by row, left to right
    assert [framed_in_red(pixels, tile) for tile in ordered] == list(labels != predictions)


def test_the_grid_of_real_images_is_a_small_png(fashion):
    images, labels = fashion
    png = render_hardest(images, labels, wrong_every_fifth(labels), np.linspace(8, 2, 32), FASHION_MNIST.classes, title="32 hardest")
    assert 10_000 < len(png) < SMALL, len(png)
    assert decode(png).shape[0] > 400  # legible: about 90 pixels per tile


@pytest.mark.parametrize("count", [3, 80])
def test_the_title_stays_whole_above_the_tiles_text_however_few_or_many_tiles(count):
    """A narrow grid wraps a long title rather than cutting it at the edges; a tall one keeps it clear of the first
    row's text (its height in inches grows with the rows, so a title placed by fraction of it would sink)."""
    labels = np.arange(count) % 10
    title = "Run 0123456789abcdef: the most suspect labels; 1,234 of 55,000 training labels estimated wrong"
    pixels = decode(render_hardest(np.full((count, 28, 28), 255, np.uint8), labels, labels, np.ones(count), FASHION_MNIST.classes, title=title))
    ink = (pixels < 128).any(axis=2)
    assert not ink[:, :3].any() and not ink[:, -3:].any(), "text cut at the figure's edge"
    first_tile = min(tiles(pixels))[0]
    lines = runs(ink[:first_tile].any(axis=1))  # the title's lines, then the first row's three lines of text
    gaps = [start - end for (_, end), (start, _) in zip(lines, lines[1:])]
    assert len(lines) >= 4 and max(gaps) >= 8, f"no gap between the title and the tiles' text: {lines}"


def test_the_grid_takes_the_split_shape_and_refuses_mismatched_inputs(fashion):
    images, labels = fashion
    assert decode(render_hardest(images[:4, :, :, None], labels[:4], labels[:4], np.ones(4), FASHION_MNIST.classes)).size
    with pytest.raises(HardestReportError, match="as many labels"):
        render_hardest(images[:4], labels[:3], labels[:4], np.ones(4), FASHION_MNIST.classes)


def test_smoothing_averages_signal_and_variance_apart_and_skips_what_is_not_finite():
    variance = np.array([4.0, np.nan, 4.0, 8.0])
    signal = np.array([2.0, 1.0, -1.0, 2.0])
    smoothed = smoothed_noise_scale(variance, signal, decay=0.5)
    # EMAs after steps 0, 2, 3 (step 1 skipped): variance 2, 3, 5.5; signal 1, 0 (no ratio), 1
    assert smoothed[0] == pytest.approx(2.0) and smoothed[1] == pytest.approx(2.0)
    assert np.isnan(smoothed[2]) and smoothed[3] == pytest.approx(5.5)
    constant = smoothed_noise_scale(np.full(50, 30.0), np.full(50, 0.5), decay=0.9)
    assert constant == pytest.approx(np.full(50, 60.0))


def noise_history(case: str = "typical", n: int = 1500, epochs: int = 3) -> NoiseHistory:
    """Estimates like a run's: the signal fades as the model fits, the variance stays; noisy enough to dip below 0."""
    rng = np.random.default_rng(0)
    steps = np.arange(1, n + 1)
    signal = 2 * np.exp(-steps / 500) + rng.normal(0, 0.4 if case != "typical" else 0.02, n)
    variance = 20 + rng.normal(0, 3, n)
    if case == "all NaN":
        signal[:] = variance[:] = np.nan
    epoch = 1 + (steps - 1) * epochs // n
    return NoiseHistory.of(steps, epoch, variance / signal, variance, signal, batch_size=64)


def coloured(pixels: np.ndarray, colour: str, tolerance: int = 40) -> np.ndarray:
    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return (np.abs(pixels - target) <= tolerance).all(axis=2)


@pytest.mark.parametrize("case", ["typical", "negative and NaN", "all NaN", "one step"])
def test_the_noise_plot_is_a_small_png_whatever_the_values(case):
    history = noise_history(case, n=1 if case == "one step" else 1500, epochs=1 if case == "one step" else 3)
    png = render_noise_scale(history)
    assert len(png) < SMALL // 2, len(png)
    pixels = decode(png)
    orange = (pixels[..., 0] > 180) & (pixels[..., 1] > 60) & (pixels[..., 1] < 150) & (pixels[..., 2] < 100)
    assert orange.sum(axis=1).max() > pixels.shape[1] // 3  # the batch size's dashed line crosses the plot


def test_the_noise_plot_draws_the_last_epochs_median_over_that_epoch():
    """run.json's number, where it comes from: a segment over the last third of the steps, at its height; none without one."""
    history = noise_history()
    assert history.median_last_epoch == pytest.approx(np.median(history.smoothed[history.epochs == 3]))
    assert history.median_last_epoch < history.smoothed_last_step  # the smoothed value rises: its end is not the median
    pixels = decode(render_noise_scale(history))
    segment = coloured(pixels, MEDIAN)
    columns = np.flatnonzero(segment[np.argmax(segment.sum(axis=1))])  # the segment's row (the key's sample line is short)
    frame = np.flatnonzero((pixels < 60).all(axis=2).sum(axis=0) > pixels.shape[0] // 3)  # the axes' sides: long and black
    left, right = frame.min(), frame.max()  # the first step's x and the last's (set_xlim)
    assert columns.min() - left == pytest.approx(2 / 3 * (right - left), abs=4) and right - columns.max() < 4
    assert not coloured(decode(render_noise_scale(noise_history("all NaN"))), MEDIAN).any()


def test_the_noise_history_refuses_columns_of_different_lengths():
    with pytest.raises(NoiseReportError, match="3 steps"):
        NoiseHistory.of(np.arange(3), np.ones(3), np.ones(2), np.ones(3), np.ones(3), 64)


def axes_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a plot's axes: its frame's long black lines."""
    black = (pixels < 60).all(axis=2)
    rows, columns = np.flatnonzero(black.sum(axis=1) > pixels.shape[1] // 2), np.flatnonzero(black.sum(axis=0) > pixels.shape[0] // 3)
    return rows.min(), rows.max(), columns.min(), columns.max()


def test_the_norm_plot_gives_each_variable_a_colour_of_its_own_and_its_key_sits_below_the_data():
    names = ["cnn/conv/kernel", "cnn/conv/bias", "cnn/dense/kernel", "cnn/dense/bias", "cnn/logits/kernel", "cnn/logits/bias"]
    steps = np.repeat(np.arange(1, 301), len(names))
    levels = np.tile([1.0, 0.9, 0.3, 0.08, 1.1, 0.1], 300)  # the biases near each other, as a real run's
    norms = levels * np.random.default_rng(0).lognormal(0, 0.3, len(steps))
    png = render_norms(steps, np.tile(names, 300), norms)
    pixels = decode(png)
    top, bottom, left, right = axes_box(pixels)
    for colour in DISTINCT[: len(names)]:
        mask = coloured(pixels, colour, tolerance=30)
        assert mask[top + 2 : bottom - 1, left + 2 : right - 1].sum() > 100, colour  # its line, on the data
        assert mask[bottom + 25 :, left:right].any(), colour  # its key entry, below the axes and their tick labels
    assert len(set(DISTINCT[: len(names)])) == len(names) and len(png) < SMALL


def test_split_images_come_in_the_order_asked(tmp_path, fashion):
    images, labels = fashion
    sample_ids = np.arange(100, 132)  # as a split holds them: sorted, not from 0
    path = tmp_path / "train.parquet"
    Storage(tmp_path).write_table(path, split_table(sample_ids, images, labels, DataShape((28, 28, 1), tuple("0123456789"))), tmp_path)
    asked = np.array([131, 100, 117, 105])
    assert np.array_equal(split_images(str(path), asked)[..., 0], images[asked - 100])
    with pytest.raises(HardestReportError, match=r"no sample_id \[7\]"):
        split_images(str(path), np.array([100, 7]))


def artifact_of(flow_run_id, key: str):
    with get_client(sync_client=True) as client:  # this flow run's: the API holds other runs' artifacts of the key too
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return artifact


def embedded(markdown: str) -> list[tuple[str, bytes]]:
    return [(alt, base64.b64decode(data)) for alt, data in re.findall(r"!\[([^]]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)]


@pytest.mark.usefixtures("prefect_api")
def test_the_hardest_examples_artifact_shows_the_grid_and_the_ranking(tmp_path, fashion):
    images, labels = fashion
    predictions = wrong_every_fifth(labels).astype(np.int16)
    predictions[1] = UNKNOWN  # wrong, in a run that did not record the class
    examples = HardestExamples(3, np.arange(500, 532), images, labels, predictions, np.arange(900, 932), np.linspace(8, 2, 32), FASHION_MNIST.classes)
    grid = render_hardest(images, labels, predictions, examples.mean_norms, examples.classes)
    root = Storage(tmp_path)
    report = HardestReport(root.layout.run("hardest-test").hardest_plot, grid, examples)

    @flow(name="hardest-artifact")
    def publish() -> None:
        create_markdown_artifact(key="hardest-examples", markdown=hardest_markdown(root, "hardest-test", report))

    artifact = artifact_of(publish(return_state=True).state_details.flow_run_id, "hardest-examples")
    assert embedded(artifact.data) == [("hardest examples", grid)]  # one picture: the noise scale is an artifact of its own
    assert "over epoch 3, the last" in artifact.data and "8 of them were predicted wrongly" in artifact.data
    assert "as `tapeline samples` shows it" in artifact.data
    table = [line for line in artifact.data.splitlines() if re.match(r"\| \d+ \|", line)]
    classes = FASHION_MNIST.classes
    assert table[0] == f"| 1 | 500 | {classes[labels[0]]} | {classes[predictions[0]]} | 900 | 8.0000 |"
    assert table[1] == f"| 2 | 501 | {classes[labels[1]]} | ? | 901 | 7.8065 |"
    assert len(table) == 32


@pytest.mark.usefixtures("prefect_api")
def test_the_noise_scale_artifact_names_each_statistic_with_its_value(tmp_path):
    history = noise_history("negative and NaN")
    png = render_noise_scale(history)
    root = Storage(tmp_path)
    report = NoiseReport(root.layout.run("noise-test").noise_plot, png, history)

    @flow(name="noise-artifact")
    def publish() -> None:
        create_markdown_artifact(key="noise-scale", markdown=noise_markdown(root, "noise-test", report))

    markdown = artifact_of(publish(return_state=True).state_details.flow_run_id, "noise-scale").data
    assert embedded(markdown) == [("gradient noise scale", png)]
    median, last = history.median_last_epoch, history.smoothed_last_step
    assert f"**{median:.4g}: the median over the last epoch (epoch 3) of the smoothed value**" in markdown
    assert f"run.json's `metrics.{NOISE_SCALE_METRIC}`" in markdown and f"batch size of about {round(median)}" in markdown
    assert f"{last:.4g}: the smoothed value" in markdown and "`step/noise_scale_smoothed`" in markdown
    assert f"`step/noise_scale_raw`): {history.raw_not_positive:,} of 1,500 steps are ≤ 0 or NaN" in markdown
    assert 0 < history.raw_not_positive < 1500 and "this run used 64" in markdown
