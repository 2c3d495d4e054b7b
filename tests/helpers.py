"""Helpers the tests share: small real IDX datasets written to disk, a tiny prepared dataset, listings of a storage
root, free loopback ports, image folders and Hub Parquet files, a training or a lease holder in a process of its
own, a full disk. Fixtures are in conftest.py; tests import helpers from here only."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from tapeline.config import RunConfig
from tapeline.data.fetch import fetch_dataset
from tapeline.data.idx import encode_idx
from tapeline.data.idx_source import FILE_NAMES as IDX_FILE_NAMES
from tapeline.data.registry import SPLIT_FILES, Dataset, DatasetFile
from tapeline.data.shape import DataShape
from tapeline.data.splits import prepare
from tapeline.results import PreparedData
from tapeline.storage.root import Storage

ROOT = Path(__file__).resolve().parent.parent  # the checkout: where the processes tests start run
HEAVY = {"tensorflow", "keras", "prefect"}  # what a quick answer does not import
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def tiny_arrays(n_train: int = 300, n_test: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """A learnable toy set: each class is a bright square at its own place."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 5)
            images[i, 2 + row * 12 : 10 + row * 12, 1 + col * 5 : 5 + col * 5] = 230
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays


def write_idx_dir(directory: Path, arrays: dict[str, np.ndarray]) -> Dataset:
    """Write arrays as the four IDX gz files and return a registry entry that matches them."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in SPLIT_FILES:
        idx = encode_idx(arrays[split])
        archive = gzip.compress(idx, mtime=0)
        (directory / FILE_NAMES[split]).write_bytes(archive)
        files[split] = DatasetFile(FILE_NAMES[split], hashlib.sha256(archive).hexdigest(), hashlib.sha256(idx).hexdigest())
    shape = DataShape((*arrays["train_images"].shape[1:3], 1), tuple("0123456789"))
    return Dataset(name="tiny", mirrors=(), files=files, shape=shape, train_count=len(arrays["train_labels"]))


def write_own_dir(directory: Path, arrays: dict[str, np.ndarray], gzipped=(), classes=None) -> dict[str, str]:
    """The four files under their standard names, raw except the splits in `gzipped`; their IDX digests."""
    directory.mkdir(parents=True, exist_ok=True)
    digests = {}
    for split in SPLIT_FILES:
        idx = encode_idx(arrays[split])
        name = IDX_FILE_NAMES[split] + (".gz" if split in gzipped else "")
        (directory / name).write_bytes(gzip.compress(idx, mtime=0) if split in gzipped else idx)
        digests[split] = hashlib.sha256(idx).hexdigest()
    if classes is not None:
        (directory / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    return digests


def tiny_prepared(directory: Path, n_train: int = 300, n_test: int = 100, storage: str | None = None, **run) -> tuple[RunConfig, PreparedData]:
    """A tiny dataset written to `directory`/source, fetched and preprocessed into `storage` (default
    `directory`/store): the validated config of a run on it (`run` are its fields besides dataset and storage)
    and the prepared splits, as the flow's first two stages would hand them to train."""
    source = directory / "source"
    dataset = write_idx_dir(source, tiny_arrays(n_train=n_train, n_test=n_test))
    config = RunConfig(dataset="mnist", storage=storage or str(directory / "store"), **run).validated()
    root = Storage(config.storage)
    return config, prepare(fetch_dataset(dataset, root, str(source)), root, config.seed, config.validation_size)


def stored_under(root: str, prefix: str) -> list[str]:
    """Every file and directory under `root`/`prefix`, a local directory or an object store's, relative to the root:
    a directory left empty is listed too (an object store has none but marker objects, which it lists)."""
    filesystem, base = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)
    listing = filesystem.get_file_info(pafs.FileSelector(f"{base}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(info.path.removeprefix(base + "/") for info in listing)


def free_ports(count: int) -> list[int]:
    """`count` different loopback ports that nothing listens on (each probe holds its port until all are chosen)."""
    with contextlib.ExitStack() as probes:
        sockets = [probes.enter_context(socket.socket()) for _ in range(count)]
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def spawn_training(config: RunConfig, data: PreparedData, run_id: str, directory: Path, result: Path | None = None, **popen) -> subprocess.Popen:
    """`train_model(config, data, run_id)` in a process of its own (tests/train_worker.py), for a test to kill it or to
    give it an environment of its own. Its job is written to `directory`; with `result`, the process writes its
    `TrainedModel` there as JSON. `popen`: subprocess.Popen's arguments (stderr goes to /dev/null unless given)."""
    job = directory / f"{run_id}.job.json"
    job.write_text(json.dumps({"config": dataclasses.asdict(config), "data": dataclasses.asdict(data), "run_id": run_id}))
    command = [sys.executable, "-m", "tests.train_worker", str(job), *([str(result)] if result else [])]
    return subprocess.Popen(command, cwd=ROOT, **{"stderr": subprocess.DEVNULL, **popen})


def kill_when(process: subprocess.Popen, ready: Callable[[], object], timeout: float = 300, poll: float = 0.02) -> int:
    """SIGKILL `process` as soon as `ready()` is true (asked every `poll` seconds), or once it has exited or `timeout`
    seconds have passed; its exit status. `ready` may also check what the process has written so far."""
    try:
        deadline = time.monotonic() + timeout
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(poll)
    finally:
        process.kill()
        process.wait()
    return process.returncode


HOLD = """
import contextlib, sys, time
from tapeline.storage.lease import RunLease
from tapeline.storage.root import Storage
with contextlib.ExitStack() as leases:
    for run_id in sys.argv[3:]:
        leases.enter_context(RunLease(Storage(sys.argv[1]), run_id, seconds=float(sys.argv[2])))
    print("holding", flush=True)
    time.sleep(600)
"""


def holder_process(root: str, *run_ids: str, seconds: float = 60) -> subprocess.Popen:
    """Another process that takes the leases of `run_ids` (default: run "same") of `root`, each `seconds` long, and
    holds them until killed."""
    command = [sys.executable, "-c", HOLD, root, str(seconds), *(run_ids or ("same",))]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "holding\n", "the holder never took the lease"
    return process


def fill(disk: Path, leave: int) -> Path:
    """A file that takes all the free space of `disk` but `leave` bytes; delete it to give the space back."""
    status = os.statvfs(disk)
    filler = disk / "filler"
    with filler.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, status.f_bavail * status.f_frsize - leave)
    return filler


def run_with_imports(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run python with -X importtime; return the result (stderr without the import lines) and the top-level packages imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    imports = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    packages = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in imports}
    result.stderr = "".join(line + "\n" for line in result.stderr.splitlines() if not line.startswith("import time:"))
    return result, packages


def pictures(n: int, shape: tuple[int, ...], label: int, seed: int) -> list[np.ndarray]:
    """`n` uint8 images of `shape` (height, width[, channels]) whose mean brightness says their class."""
    rng = np.random.default_rng(seed)
    return [np.clip(rng.integers(0, 60, shape) + 40 * label, 0, 255).astype(np.uint8) for _ in range(n)]


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array).save(path)


def image_folder(directory: Path, classes: dict[str, int], shape=(12, 10, 3), split=True, seed=0) -> dict[str, list[np.ndarray]]:
    """PNG files, `classes[name]` per class (train/ and test/ with 2 more each when `split`); the arrays by split."""
    written = {"train": [], "test": []}
    for label, (name, count) in enumerate(sorted(classes.items())):
        for part, n in (("train", count), ("test", 2)) if split else (("", count),):
            for i, array in enumerate(pictures(n, shape, label, seed + 17 * label + len(part))):
                write_png(directory / part / name / f"{i:03d}.png", array)
                written[part or "train"].append(array)
    return written


def hub_parquet(directory: Path, classes: list[str] | None, shape=(8, 8, 3), counts=(("train", 10), ("test", 4)), tensor=False) -> dict:
    """The Hub's layout: data/<split>-00000-of-00001.parquet, images as PNG bytes (or a tensor column), ClassLabel names."""
    written = {}
    features = {"image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()} if classes else None
    for split, n in counts:
        labels = np.arange(n) % (len(classes) if classes else 3)
        arrays = [pictures(1, shape, int(label), i)[0] for i, label in enumerate(labels)]
        if tensor:
            image = pa.ExtensionArray.from_storage(
                pa.fixed_shape_tensor(pa.uint8(), list(shape)), pa.FixedSizeListArray.from_arrays(pa.array(np.stack(arrays).reshape(-1)), int(np.prod(shape)))
            )
        else:
            image = pa.array(
                [{"bytes": png_bytes(a), "path": f"{i}.png"} for i, a in enumerate(arrays)], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            )
        table = pa.table({"image": image, "label": pa.array(labels, pa.int64())}).replace_schema_metadata(metadata)
        (directory / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, directory / "data" / f"{split}-00000-of-00001.parquet")
        written[split] = (np.stack(arrays), labels)
    return written


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def fresh_process_accuracy(run: Path, manifest: dict) -> float:
    """The test accuracy of a run's model.keras loaded in a new Python process by the model card's own code (its
    `load.code`, which imports the model's module first when it has classes of its own), on the run's test split."""
    card = json.loads((run / "model.json").read_text())
    score = f"""
import numpy as np, pyarrow.parquet as pq
{card["load"]["code"].replace("model.keras", manifest["uris"]["model"])}
model = keras.models.load_model({manifest["uris"]["model"]!r})
test = pq.read_table({manifest["uris"]["test"]!r})
images = test.column("image").combine_chunks().to_numpy_ndarray()
print(float(np.mean(np.argmax(model.predict(images, verbose=0), axis=1) == test.column("label").to_numpy())))
"""
    result = subprocess.run([sys.executable, "-c", score], capture_output=True, text=True, cwd="/", check=True)
    return float(result.stdout.split()[-1])
