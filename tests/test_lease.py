"""One writer per run: the run lease, locally (flock) and on a real S3-compatible server (moto), with real processes."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from tapeline.data.splits import read_split
from tapeline.registry.champion import current_champion
from tapeline.storage.lease import RunLease, RunLeaseHeld
from tapeline.storage.root import Storage
from tapeline.storage.versioned import VersionedObject
from tests.helpers import stored_under

ROOT = Path(__file__).resolve().parent.parent
WHERE = ["local", "s3"]


def storage_root(where: str, tmp_path: Path, request) -> str:
    return str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3").uri(f"lease-{tmp_path.name}")


HOLD = """
import sys, time
from tapeline.storage.lease import RunLease
from tapeline.storage.root import Storage
with RunLease(Storage(sys.argv[1]), sys.argv[3], seconds=float(sys.argv[2])):
    print("holding", flush=True)
    time.sleep(600)
"""


def holder_process(root: str, seconds: float = 60, run_id: str = "same") -> subprocess.Popen:
    """Another process that takes the lease of run `run_id` and holds it until killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, root, str(seconds), run_id], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "holding\n", "the holder never took the lease"
    return process


@pytest.mark.parametrize("where", WHERE)
def test_a_held_lease_is_refused_with_its_holder(where, tmp_path, request):
    storage = Storage(storage_root(where, tmp_path, request))
    holder = holder_process(storage.uri)
    try:
        with pytest.raises(RunLeaseHeld) as refused, RunLease(storage, "same"):
            pass
        message = str(refused.value)
        assert f"run 'same' is being written by {socket.gethostname()} pid {holder.pid} since " in message
        assert "choose another --run-name" in message
        with RunLease(storage, "other"):  # another run of the same root is free
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_local_lease_dies_with_its_process(tmp_path):
    storage = Storage(tmp_path)
    holder = holder_process(storage.uri)
    holder.kill()
    holder.wait()
    with RunLease(storage, "same"):  # at once: the kernel released the flock
        pass


def test_an_s3_lease_is_renewed_then_expires_after_its_holder_dies(s3, tmp_path, capsys):
    storage = Storage(s3.uri(f"expiry-{tmp_path.name}"))
    holder = holder_process(storage.uri, seconds=2)
    time.sleep(5)  # two and a half lifetimes: only the heartbeat keeps it
    with pytest.raises(RunLeaseHeld):
        RunLease(storage, "same").__enter__()
    holder.kill()
    holder.wait()
    with pytest.raises(RunLeaseHeld):  # not yet expired
        RunLease(storage, "same").__enter__()
    time.sleep(2.5)
    with RunLease(storage, "same", seconds=2):
        assert f"took over the expired lease of {socket.gethostname()} pid {holder.pid}" in capsys.readouterr().out
    assert VersionedObject(storage, storage.layout.run("same").lease).read() == (None, None)  # released: deleted


def test_a_holder_that_lost_its_s3_lease_stops_at_the_next_stage(s3, tmp_path):
    storage = Storage(s3.uri(f"lost-{tmp_path.name}"))
    with RunLease(storage, "same", seconds=1.5) as lease:
        lease_object = VersionedObject(storage, lease.path)
        _, version = lease_object.read()
        assert lease_object.swap({"host": "elsewhere", "pid": 7, "since": "then", "expires": time.time() + 60}, version)
        time.sleep(1.5)  # a heartbeat or two
        with pytest.raises(RunLeaseHeld, match="lost its lease to elsewhere pid 7"):
            lease.check()
    assert lease_object.read()[0]["host"] == "elsewhere"  # the loser leaves the new holder's lease alone


@pytest.mark.parametrize("where", WHERE)
def test_a_run_that_wrote_nothing_leaves_nothing_and_one_with_checkpoints_keeps_them(where, tmp_path, request, monkeypatch):
    root = storage_root(where, tmp_path, request)
    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "work"))
    storage = Storage(root)
    with pytest.raises(ValueError), RunLease(storage, "refused"):
        storage.layout.run("refused").tensorboard.mkdir(parents=True)  # a library may make a directory first (locally)
        raise ValueError("a bad label")
    assert stored_under(root, "runs") == []
    checkpoint = storage.layout.run("kept").checkpoints / "checkpoint"
    with pytest.raises(ValueError), RunLease(storage, "kept"):
        with storage.atomic(checkpoint) as temporary:
            temporary.write_text("model_checkpoint_path: 'ckpt-1'\n")
        raise ValueError("a failure after the first checkpoint")
    assert stored_under(root, "runs") == ["runs/kept", "runs/kept/checkpoints", "runs/kept/checkpoints/checkpoint"]


TAKE_TURNS = """
import os, sys
from tapeline.storage.lease import RunLease, RunLeaseHeld
from tapeline.storage.root import Storage
storage, turns = Storage(sys.argv[1]), 0
inside = storage.layout.run("same").directory / "inside"
while turns < 200:
    try:
        with RunLease(storage, "same"):
            os.close(os.open(inside, os.O_CREAT | os.O_EXCL))  # fails if another process holds the lease too
            os.unlink(inside)
            turns += 1
    except RunLeaseHeld:
        pass
"""


def test_local_leases_released_by_deletion_still_admit_one_holder_at_a_time(tmp_path):
    """Every release deletes the lease file and the run directory: processes taking turns never hold it at once."""
    racers = [subprocess.Popen([sys.executable, "-c", TAKE_TURNS, str(tmp_path)], cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [racer.communicate(timeout=300)[1] for racer in racers]
    assert [racer.returncode for racer in racers] == [0] * 4, errors
    assert stored_under(str(tmp_path), "runs") == []


# Real runs of the CLI, racing and killed: Fashion-MNIST, a few hundred samples.


def train_command(fashion_mnist_dir: Path, root: str, *flags: str) -> list[str]:
    return [
        sys.executable, "flows/train.py", "--dataset", "fashion-mnist", "--source", str(fashion_mnist_dir), "--storage", root,
        "--run-name", "same", "--epochs", "1", "--validation-size", "100", *flags,
    ]  # fmt: skip


@pytest.fixture
def cli_env(prefect_api, s3, tmp_path) -> dict:
    """The CLI's environment: the test API, and the S3 server's address and keys (for the s3 cases)."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "TAPELINE_WORKDIR": str(tmp_path / "workdir")}


def start(command: list[str], env: dict, **popen) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=env, text=True, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen})


def model_accuracy(storage: Storage, run: dict) -> float:
    """The test accuracy of the model.keras that the run directory holds, measured anew."""
    model = keras.models.load_model(storage.local(run["uris"]["model"]))
    images, labels, _ = read_split(run["uris"]["test"])
    predictions = np.argmax(model.predict(images, batch_size=1024, verbose=0), axis=1)
    return float(np.mean(predictions == labels))


@pytest.mark.slow
@pytest.mark.parametrize("where", WHERE)
def test_two_processes_racing_on_one_run_name(where, tmp_path, request, fashion_mnist_dir, cli_env):
    root = storage_root(where, tmp_path, request)
    racers = {seed: start(train_command(fashion_mnist_dir, root, "--seed", str(seed), "--train-limit", "500"), cli_env) for seed in (1, 2)}
    outcomes = {seed: (racer.wait(timeout=600), *racer.communicate()) for seed, racer in racers.items()}
    assert sorted(code for code, _, _ in outcomes.values()) == [0, 2], outcomes
    winner = next(seed for seed, (code, _, _) in outcomes.items() if code == 0)
    _, out, err = outcomes[3 - winner]
    last = err.strip().splitlines()[-1]
    assert f"error: run 'same' is being written by {socket.gethostname()} pid {racers[winner].pid} since " in last
    assert "Traceback" not in err + out and "training on" not in out  # an expected failure, before any stage

    storage = Storage(root)
    run = storage.read_json(storage.layout.run("same").run_json)
    champion = current_champion(storage)
    assert run["parameters"]["seed"] == winner and champion["run_id"] == "same"
    assert champion["test_accuracy"] == run["metrics"]["test_accuracy"] == pytest.approx(model_accuracy(storage, run), abs=1e-6)


def checkpoint_written(storage: Storage) -> bool:
    return storage.exists(storage.layout.run("same").checkpoints / "checkpoint")


@pytest.mark.slow
@pytest.mark.parametrize("where", WHERE)
def test_a_rerun_takes_over_from_a_killed_holder_and_resumes(where, tmp_path, request, fashion_mnist_dir, cli_env):
    root, env = storage_root(where, tmp_path, request), {**cli_env, "TAPELINE_LEASE_SECONDS": "3"}
    command = train_command(fashion_mnist_dir, root, "--train-limit", "2000", "--checkpoint-every", "20")
    storage = Storage(root)
    first = start(command, env)
    deadline = time.monotonic() + 300
    while not checkpoint_written(storage) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first.kill()
    _, err = first.communicate()
    assert checkpoint_written(storage), err
    if where == "s3":
        time.sleep(3)  # the dead holder's lease expires
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from checkpoint" in rerun.stdout + rerun.stderr  # Prefect logs the task's prints
    run = storage.read_json(storage.layout.run("same").run_json)
    assert current_champion(storage)["test_accuracy"] == run["metrics"]["test_accuracy"]


def live_processes_in_group(pgid: int) -> list[str]:
    """The command lines of the processes of process group `pgid` that have not exited (zombies left out)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):  # exited while we looked
            continue
        if int(group) == pgid and state != "Z":
            found.append(command)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("where", WHERE)
def test_sigterm_releases_the_lease_and_the_temporary_api_and_a_rerun_resumes(where, tmp_path, request, fashion_mnist_dir):
    """`kill` (SIGTERM, as `docker stop` and systemd send) while training, with no PREFECT_API_URL, so Prefect runs a
    temporary API for the run: exit status 143 and one line, nothing of the run's process group left running, the
    lease free at once (an S3 lease released, not left to expire), and a rerun resumes from the checkpoint."""
    root = storage_root(where, tmp_path, request)
    storage = Storage(root)
    env = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"), "TAPELINE_WORKDIR": str(tmp_path / "workdir"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a new database's migrations, on a busy machine
    }  # fmt: skip
    command = train_command(fashion_mnist_dir, root, "--train-limit", "2000", "--checkpoint-every", "20")
    out, err = tmp_path / "out", tmp_path / "err"  # files, not pipes: a leaked child holding a pipe open would hang the test
    with out.open("w") as stdout, err.open("w") as stderr:
        first = start(command, env, stdout=stdout, stderr=stderr, start_new_session=True)  # the temporary API joins its group
    try:
        deadline = time.monotonic() + 300
        while not checkpoint_written(storage) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        first.terminate()
        first.wait(timeout=300)
    finally:
        left = live_processes_in_group(first.pid)
        if left:
            os.killpg(first.pid, signal.SIGKILL)
    log = err.read_text()
    assert first.returncode == 143, log[-3000:]
    assert log.strip().splitlines()[-1] == "flows/train.py: stopped by SIGTERM"
    assert "run same stopped; run it again (--run-name same) to resume from its last checkpoint" in log
    assert "Traceback" not in log + out.read_text()
    assert not left
    with RunLease(storage, "same"):  # free now: for S3, 120 s before an unreleased lease would expire
        pass

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from checkpoint" in rerun.stdout + rerun.stderr
    assert storage.read_json(storage.layout.run("same").run_json)["status"] == "completed"
