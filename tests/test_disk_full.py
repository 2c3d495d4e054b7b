"""A full disk in the middle of a run, on a real tmpfs, through `tapeline train` as a process: one line, exit 1,
nothing half-written; given space, the rerun resumes and leaves nothing behind."""

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tapeline.data.registry import FASHION_MNIST
from tapeline.gradients.schema import STAT_NAMES
from tapeline.gradients.writers import SnapshotWriter, StepLog
from tapeline.model import build_model
from tapeline.reader import read_steps
from tapeline.storage.layout import RunPaths
from tapeline.storage.lease import RunLease
from tapeline.storage.root import TEMP_SUFFIX, Storage, StorageFull
from tapeline.training.summaries import RunSummaries
from tests.helpers import tiny_arrays
from tests.test_idx_source import write_own_dir

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    """mount(megabytes): a new tmpfs of that size, unmounted after the test."""
    mounted = []

    def mount(megabytes: int) -> Path:
        directory = tmp_path / f"disk{len(mounted)}"
        directory.mkdir()
        options = f"size={megabytes}m,uid={os.getuid()},gid={os.getgid()}"
        subprocess.run([*_as_root(), "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], check=True)
        mounted.append(directory)
        return directory

    yield mount
    gc.collect()  # a failed write's exception, in a reference cycle, may still hold its (deleted) file open
    for directory in mounted:
        subprocess.run([*_as_root(), "umount", str(directory)], check=True)


def _as_root() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo", "-n"]


def fill(disk: Path, leave: int) -> Path:
    """A file that takes all the free space of `disk` but `leave` bytes; delete it to give the space back."""
    status = os.statvfs(disk)
    filler = disk / "filler"
    with filler.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, status.f_bavail * status.f_frsize - leave)
    return filler


@pytest.fixture
def cli_env(prefect_api) -> dict:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


def tapeline_train(env: dict, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tapeline.cli", "train", "--epochs", "1", "--spike-factor", "1e9", *flags]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def assert_storage_full(result: subprocess.CompletedProcess, root: Path, writing: str) -> None:
    """Exit 1, no traceback, and the last line of stderr the one error line: the root, no space, what to do."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert [line for line in lines if line.startswith("tapeline train: error:")] == lines[-1:], result.stderr[-3000:]
    assert lines[-1].startswith(f"tapeline train: error: no space left on the device of the storage root {root} (writing {writing}")
    assert lines[-1].endswith("free space there and rerun; the run resumes where it stopped")


def leftovers(root: Path) -> list[str]:
    """What an unfinished write leaves: our temporary files (`.tmp`), TensorFlow's (`<checkpoint>_temp/`, `checkpoint.tmp…`)."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if TEMP_SUFFIX in path.name or path.name.endswith("_temp"))


def latest_checkpoint(run: Path) -> str:
    return (run / "checkpoints" / "checkpoint").read_text().splitlines()[0]  # model_checkpoint_path: "ckpt-20"


def write_run_json(storage: Storage, run: RunPaths) -> None:
    storage.write_json(run.run_json, {"run_id": run.run_id})


def write_model(storage: Storage, run: RunPaths) -> None:
    with storage.atomic(run.model, suffix=".keras") as temporary:  # as training saves it
        build_model().save(temporary)


def write_snapshot(storage: Storage, run: RunPaths) -> None:
    """A gradient snapshot, written on the writer's thread; the error comes back on close."""
    variables = build_model().trainable_variables
    with SnapshotWriter(storage, run.gradients, run.run_id, [v.path for v in variables]) as writer:
        writer.write(1, 1, "scheduled", [v.numpy() for v in variables], [1.0] * len(variables))


def write_step_log(storage: Storage, run: RunPaths) -> None:
    """The steps, stats and samples files of a flush, written on the log's thread; the error comes back on close."""
    variables = [v.path for v in build_model().trainable_variables]
    log = StepLog(storage, run, variables)
    log.append(1, 1, {"loss": 0.5, "global_norm": 1.0, "learning_rate": 1e-3}, np.arange(16), np.ones((len(variables), len(STAT_NAMES)), np.float32))
    log.flush()
    log.close()


def write_event_file(storage: Storage, run: RunPaths) -> None:
    """A snapshot's histograms in TensorBoard's event file, published as at an epoch's end."""
    variables = build_model().trainable_variables
    with RunSummaries(storage, run.tensorboard, writes=True) as summaries:
        summaries.snapshot(1, [v.path for v in variables], [np.random.default_rng(0).normal(size=v.shape) for v in variables])
        summaries.publish()


def take_lease(storage: Storage, run: RunPaths) -> None:
    with RunLease(storage, run.run_id):
        pass


@pytest.mark.parametrize("write", [write_run_json, write_model, write_snapshot, write_step_log, write_event_file, take_lease])
def test_every_writer_on_a_full_disk_raises_storage_full(write, small_disk):
    disk = small_disk(8)
    root = disk / "store"
    storage = Storage(root)
    run = storage.layout.run("full")
    run.directory.mkdir(parents=True)
    fill(disk, leave=0)
    with pytest.raises(StorageFull) as raised:
        write(storage, run)
    assert str(raised.value).startswith(f"no space left on the device of the storage root {root} (writing runs/full/")
    assert leftovers(root) == []


@pytest.mark.slow
def test_full_while_downloading(small_disk, cli_env, fashion_mnist_dir):
    """The disk fills while the dataset is copied into the cache: the two training files fit, the test images do not."""
    disk = small_disk(256)
    root = disk / "store"
    files = FASHION_MNIST.files
    fits = sum((fashion_mnist_dir / files[split].name).stat().st_size for split in ("train_images", "train_labels"))
    filler = fill(disk, leave=fits + (fashion_mnist_dir / files["test_images"].name).stat().st_size // 2)
    flags = ["--dataset", "fashion-mnist", "--source", str(fashion_mnist_dir), "--storage", str(root), "--run-name", "download"]
    flags += ["--train-limit", "300", "--validation-size", "100"]

    full = tapeline_train(cli_env, *flags)
    assert_storage_full(full, root, "cache/fashion-mnist/")
    assert "--source" not in full.stderr.strip().splitlines()[-1]  # the source is fine: the disk is full
    assert leftovers(root) == []
    cached = Storage(root).layout.cache_file("fashion-mnist", files["train_images"].idx_sha256)
    before = cached.stat()

    filler.unlink()
    rerun = tapeline_train(cli_env, *flags)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (cached.stat().st_ino, cached.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not fetched again
    assert (root / "runs" / "download" / "run.json").exists() and leftovers(root) == []


def test_full_while_checkpointing(small_disk, cli_env, tmp_path):
    """The first checkpoint fits, the second does not; the rerun resumes from the first and finishes."""
    own = tmp_path / "own"
    write_own_dir(own, tiny_arrays(n_train=1000, n_test=50))  # 900 training samples, 57 steps of 16
    disk = small_disk(256)
    root = disk / "store"
    parameter_bytes = 4 * build_model().count_params()
    checkpoint = 3 * parameter_bytes  # the weights and Adam's two moments
    # The data and logs (about 2 MiB), the snapshot of step 1 and the checkpoint of step 20 fit; then half a checkpoint.
    filler = fill(disk, leave=2 * MIB + parameter_bytes + checkpoint + checkpoint // 2)
    flags = ["--dataset", "idx", "--source", str(own), "--storage", str(root), "--run-name", "full", "--batch-size", "16"]
    flags += ["--validation-size", "100", "--checkpoint-every", "20", "--snapshot-every", "1000"]
    run = root / "runs" / "full"

    full = tapeline_train(cli_env, *flags)
    assert_storage_full(full, root, "runs/full/checkpoints")
    assert leftovers(root) == []
    assert latest_checkpoint(run) == 'model_checkpoint_path: "ckpt-20"' and not (run / "run.json").exists()

    filler.unlink()
    rerun = tapeline_train(cli_env, *flags, "--keep-checkpoints")  # its last checkpoint checked below
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from checkpoint {run / 'checkpoints' / 'ckpt-20'} at step 20" in rerun.stdout + rerun.stderr
    assert leftovers(root) == []
    assert read_steps(run).sort_by("step").column("step").to_pylist() == list(range(1, 58))  # every step once
    assert latest_checkpoint(run) == 'model_checkpoint_path: "ckpt-57"' and (run / "run.json").exists()
