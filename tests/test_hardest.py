"""The hardest-examples report: its two pictures (real PNGs, small, one tile per example, wrong ones framed in red),
the smoothed noise scale, the split's images by sample_id, and the artifact through a real Prefect API."""

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
from tapeline.data.splits import split_table
from tapeline.gradients.hardest import (
    HardestExamples,
    HardestReport,
    HardestReportError,
    render_hardest,
    render_noise_scale,
    split_images,
)
from tapeline.gradients.noise import smoothed_noise_scale
from tapeline.storage.root import Storage
from tapeline.tasks.export import hardest_markdown

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


@pytest.mark.parametrize(
    "case",
    ["typical", "negative and NaN", "all NaN", "one step"],
)
def test_the_noise_plot_is_a_small_png_whatever_the_values(case):
    rng = np.random.default_rng(0)
    n = {"one step": 1}.get(case, 1500)
    steps = np.arange(n)
    signal = 2 * np.exp(-steps / 500) + rng.normal(0, 0.4 if case != "typical" else 0.02, n)
    variance = 20 + rng.normal(0, 3, n)
    if case == "all NaN":
        signal[:] = variance[:] = np.nan
    raw = variance / signal
    png = render_noise_scale(steps, raw, variance, signal, batch_size=64)
    assert len(png) < SMALL // 2, len(png)
    pixels = decode(png)
    orange = (pixels[..., 0] > 180) & (pixels[..., 1] > 60) & (pixels[..., 1] < 150) & (pixels[..., 2] < 100)
    assert orange.sum(axis=1).max() > pixels.shape[1] // 3  # the batch size's dashed line crosses the plot


def test_the_noise_plot_refuses_columns_of_different_lengths():
    with pytest.raises(HardestReportError, match="3 steps"):
        render_noise_scale(np.arange(3), np.ones(2), np.ones(3), np.ones(3), 64)


def test_split_images_come_in_the_order_asked(tmp_path, fashion):
    images, labels = fashion
    sample_ids = np.arange(100, 132)  # as a split holds them: sorted, not from 0
    path = tmp_path / "train.parquet"
    Storage(tmp_path).write_table(path, split_table(sample_ids, images, labels), tmp_path)
    asked = np.array([131, 100, 117, 105])
    assert np.array_equal(split_images(str(path), asked)[..., 0], images[asked - 100])
    with pytest.raises(HardestReportError, match=r"no sample_id \[7\]"):
        split_images(str(path), np.array([100, 7]))


@pytest.mark.usefixtures("prefect_api")
def test_the_artifact_shows_both_pictures_in_prefect(tmp_path, fashion):
    images, labels = fashion
    predictions = wrong_every_fifth(labels)
    examples = HardestExamples(np.arange(500, 532), images, labels, predictions, np.linspace(8, 2, 32), FASHION_MNIST.classes)
    steps = np.arange(300)
    grid = render_hardest(images, labels, predictions, examples.mean_norms, examples.classes)
    noise = render_noise_scale(steps, np.full(300, 40.0), np.full(300, 20.0), np.full(300, 0.5), 64)
    root = Storage(tmp_path)
    run = root.layout.run("hardest-test")
    report = HardestReport(run.hardest_plot, run.noise_plot, grid, noise, examples, 64, 40.0)

    @flow(name="hardest-artifact")
    def publish() -> None:
        create_markdown_artifact(key="hardest-examples", markdown=hardest_markdown(root, "hardest-test", report))

    flow_run_id = publish(return_state=True).state_details.flow_run_id
    with get_client(sync_client=True) as client:  # this flow run's: the API holds other runs' artifacts of the key too
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["hardest-examples"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    embedded = re.findall(r"!\[([^]]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", artifact.data)
    assert [(alt, base64.b64decode(data)) for alt, data in embedded] == [("hardest examples", grid), ("gradient noise scale", noise)]
    assert "the trained model predicts 7 of them wrongly" in artifact.data
    assert "Sample ids, hardest first: 500, 501," in artifact.data and "the batch size used 64" in artifact.data
