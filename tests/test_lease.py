"""One writer per run: the run lease, locally (flock) and on a real S3-compatible server (moto), with real processes:
exclusion, refusal and takeover on RunLease itself, renewal driven by hand; the race between two CLI runs once, and
SIGTERM once, through the CLI."""

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
from tapeline.storage.lease import RunLease, RunLeaseHeld, live_holder
from tapeline.storage.root import Storage
from tapeline.storage.versioned import VersionedObject
from tests.helpers import ROOT, holder_process, stored_under

WHERE = ["local", "s3"]


def storage_root(where: str, tmp_path: Path, request) -> str:
    return str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3").uri(f"lease-{tmp_path.name}")


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


def test_a_killed_holders_s3_lease_holds_until_it_expires_then_is_taken_over(s3, tmp_path, capsys):
    """A lease of 10 minutes outlives its SIGKILLed holder; one of a second is taken over once it has expired."""
    storage = Storage(s3.uri(f"expiry-{tmp_path.name}"))
    holders = {"long": holder_process(storage.uri, "long", seconds=600), "short": holder_process(storage.uri, "short", seconds=1)}
    for holder in holders.values():
        holder.kill()
        holder.wait()
    with pytest.raises(RunLeaseHeld, match=f"pid {holders['long'].pid} since "):
        RunLease(storage, "long").__enter__()
    deadline = time.monotonic() + 60
    while live_holder(storage, "short") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    with RunLease(storage, "short"):
        assert f"took over the expired lease of {socket.gethostname()} pid {holders['short'].pid}" in capsys.readouterr().out
    assert VersionedObject(storage, storage.layout.run("short").lease).read() == (None, None)  # released: deleted


def test_renewing_an_s3_lease_extends_it_and_finds_it_lost_to_another_process(s3, tmp_path, capsys):
    """Renewed by hand (a 10-minute lease: its heartbeat does not beat during the test)."""
    storage = Storage(s3.uri(f"renew-{tmp_path.name}"))
    with RunLease(storage, "same", seconds=600) as lease:
        lease_object = VersionedObject(storage, lease.path)
        taken, version = lease_object.read()
        assert lease.renew()
        renewed, renewed_version = lease_object.read()
        assert renewed_version != version and renewed["expires"] > taken["expires"]
        assert {**renewed, "expires": None} == {**taken, "expires": None}
        with pytest.raises(RunLeaseHeld):
            RunLease(storage, "same").__enter__()

        assert lease_object.swap({"host": "elsewhere", "pid": 7, "since": "then", "expires": time.time() + 60}, renewed_version)
        lease.check()  # not known yet: the holder finds out at its next renewal
        assert not lease.renew()
        assert "lease lost to elsewhere pid 7 since then" in capsys.readouterr().out
        with pytest.raises(RunLeaseHeld, match="lost its lease to elsewhere pid 7"):
            lease.check()
    assert lease_object.read()[0]["host"] == "elsewhere"  # the loser leaves the new holder's lease alone


def test_the_heartbeat_renews_an_s3_lease(s3, tmp_path):
    storage = Storage(s3.uri(f"heartbeat-{tmp_path.name}"))
    with RunLease(storage, "same", seconds=1.5) as lease:
        lease_object = VersionedObject(storage, lease.path)
        taken, _ = lease_object.read()
        deadline = time.monotonic() + 60
        while (current := lease_object.read()[0])["expires"] == taken["expires"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert current["expires"] > taken["expires"] and current["pid"] == os.getpid()
        lease.check()


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
import os, sys, time
from tapeline.storage.lease import RunLease, RunLeaseHeld
from tapeline.storage.root import Storage
storage, inside, turns, refused = Storage(sys.argv[1]), sys.argv[2], 0, 0
while turns < int(sys.argv[3]):
    try:
        with RunLease(storage, "same"):
            os.close(os.open(inside, os.O_CREAT | os.O_EXCL))  # fails if another process holds the lease too
            os.unlink(inside)
            turns += 1
    except RunLeaseHeld:
        refused += 1
        time.sleep(0.01)  # on S3 every try builds a client: spinning would starve the holder of CPU
print(refused)
"""


@pytest.mark.parametrize("where", WHERE)
def test_processes_taking_turns_never_hold_a_lease_at_once(where, tmp_path, request):
    """Four processes take one run's lease in turn, as fast as they can. Every local release deletes the lease file and
    the run directory (the witness file is inside it); every S3 release deletes the lease object, and the next take
    creates it only if absent."""
    root = storage_root(where, tmp_path, request)
    inside = Storage(root).layout.run("same").directory / "inside" if where == "local" else tmp_path / "inside"
    turns = 200 if where == "local" else 10
    command = [sys.executable, "-c", TAKE_TURNS, root, str(inside), str(turns)]
    racers = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [racer.communicate(timeout=300) for racer in racers]
    assert [racer.returncode for racer in racers] == [0] * 4, outputs
    assert sum(int(out) for out, _ in outputs) > 0  # they did contend
    assert stored_under(root, "runs") == []


# Real runs of the CLI, racing and stopped: Fashion-MNIST, a few hundred samples. A rerun after a SIGKILL, on S3 once
# the dead holder's lease has expired, is tests/test_retention.py's killed run.


def train_command(fashion_mnist_dir: Path, root: str, *flags: str) -> list[str]:
    return [
        sys.executable, "flows/train.py", "--dataset", "fashion-mnist", "--source", str(fashion_mnist_dir), "--storage", root,
        "--run-name", "same", "--epochs", "1", "--validation-size", "100", *flags,
    ]  # fmt: skip


def start(command: list[str], env: dict, **popen) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=env, text=True, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen})


def model_accuracy(storage: Storage, run: dict) -> float:
    """The test accuracy of the model.keras that the run directory holds, measured anew."""
    model = keras.models.load_model(storage.local(run["uris"]["model"]))
    images, labels, _ = read_split(run["uris"]["test"])
    predictions = np.argmax(model.predict(images, batch_size=1024, verbose=0), axis=1)
    return float(np.mean(predictions == labels))


@pytest.mark.slow
def test_two_processes_racing_on_one_run_name(tmp_path, fashion_mnist_dir, prefect_api):
    """Two `flows/train.py` runs of one name at once: one trains, the other stops before any stage with one line that
    names the winner (which RunLease refuses, locally and on S3, the tests above show)."""
    from prefect.settings import PREFECT_API_URL

    root = str(tmp_path / "store")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "TAPELINE_WORKDIR": str(tmp_path / "workdir")}
    racers = {seed: start(train_command(fashion_mnist_dir, root, "--seed", str(seed), "--train-limit", "500"), env) for seed in (1, 2)}
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
def test_sigterm_releases_the_lease_and_the_temporary_api_and_a_rerun_resumes(s3, tmp_path, fashion_mnist_dir, prefect_api):
    """`kill` (SIGTERM, as `docker stop` and systemd send) while training on S3, with no PREFECT_API_URL, so Prefect runs
    a temporary API for the run: exit status 143 and one line, nothing of the run's process group left running, the
    S3 lease released at once (not left to expire, as a SIGKILLed holder's is), and a rerun resumes from the checkpoint."""
    from prefect.settings import PREFECT_API_URL

    root = s3.uri(f"sigterm-{tmp_path.name}")
    storage = Storage(root)
    env = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"), "TAPELINE_WORKDIR": str(tmp_path / "workdir"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a new database's migrations, on a busy machine
    }  # fmt: skip
    command = train_command(fashion_mnist_dir, root, "--train-limit", "2000", "--checkpoint-every", "20")
    checkpoint = storage.layout.run("same").checkpoints / "checkpoint"
    out, err = tmp_path / "out", tmp_path / "err"  # files, not pipes: a leaked child holding a pipe open would hang the test
    with out.open("w") as stdout, err.open("w") as stderr:
        first = start(command, env, stdout=stdout, stderr=stderr, start_new_session=True)  # the temporary API joins its group
    try:
        deadline = time.monotonic() + 300
        while not storage.exists(checkpoint) and first.poll() is None and time.monotonic() < deadline:
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
    with RunLease(storage, "same"):  # free now: a lease left behind would hold for 120 s
        pass

    # The rerun on the session's API: another temporary one would prove nothing more, and costs a server's start.
    rerun = subprocess.run(command, cwd=ROOT, env={**env, "PREFECT_API_URL": PREFECT_API_URL.value()}, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from checkpoint" in rerun.stdout + rerun.stderr
    assert storage.read_json(storage.layout.run("same").run_json)["status"] == "completed"
