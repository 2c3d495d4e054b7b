"""Multi-worker training (TF_CONFIG, MultiWorkerMirroredStrategy): two worker processes on loopback against one."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest

from tapeline.errors import ConfigError
from tapeline.flows import train  # noqa: F401  Prefect binds its log handlers to stderr on import: the session's, not a test's capsys
from tapeline.gradients.export import publish_gradients
from tapeline.reader import read_gradients
from tapeline.results import TrainedModel
from tapeline.storage.layout import Layout, RunPaths
from tapeline.storage.root import Storage
from tapeline.training.cluster import check_cluster, cluster_from_env
from tapeline.training.loop import train_model
from tests.helpers import ROOT, free_ports, spawn_training, tiny_prepared

TIMEOUT = 300  # seconds for the whole two-process run: a hang fails the test instead of stalling the suite


def run_files(run_dir: Path) -> set[str]:
    """The run's file names, the TensorBoard event file's host, time and pid left out."""
    return {str(p.relative_to(run_dir)).split(".out.tfevents.")[0] for p in run_dir.rglob("*")}


def finish(processes: dict[str, subprocess.Popen]) -> dict[str, str]:
    """Each process's output (stdout) once it ends; those still running after TIMEOUT are killed (a hang fails the test)."""
    deadline, outputs = time.monotonic() + TIMEOUT, {}
    try:
        for name, process in processes.items():
            try:
                outputs[name] = process.communicate(timeout=max(deadline - time.monotonic(), 0))[0]
            except subprocess.TimeoutExpired:
                process.kill()
                outputs[name] = process.communicate()[0] + f"\n[killed: still running after {TIMEOUT} s]"
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return outputs


def outcomes(processes: dict[str, subprocess.Popen], outputs: dict[str, str]) -> str:
    """Every process's exit code and the end of its output: when one dies, the others only report a closed socket."""
    return "\n\n".join(f"{name} exited with {process.returncode}:\n{outputs.get(name, '')[-3000:]}" for name, process in processes.items())


def tf_config(addresses: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def test_tf_config_roles():
    two = ["127.0.0.1:1", "127.0.0.1:2"]
    assert cluster_from_env({}) is None
    assert cluster_from_env({"TF_CONFIG": tf_config(two[:1], 0)}) is None  # one worker: one-machine training
    assert cluster_from_env({"TF_CONFIG": tf_config(two, 0)}).chief
    assert not cluster_from_env({"TF_CONFIG": tf_config(two, 1)}).chief
    with_chief = {"cluster": {"chief": ["c:1"], "worker": two}, "task": {"type": "worker", "index": 0}}
    assert not cluster_from_env({"TF_CONFIG": json.dumps(with_chief)}).chief
    assert cluster_from_env({"TF_CONFIG": json.dumps(with_chief | {"task": {"type": "chief", "index": 0}})}).workers == 3
    with pytest.raises(ConfigError, match="jobs ps are not supported"):
        cluster_from_env({"TF_CONFIG": json.dumps({"cluster": {"worker": two, "ps": ["p:1"]}, "task": {"type": "worker"}})})
    with pytest.raises(ConfigError, match="is not in the cluster"):
        cluster_from_env({"TF_CONFIG": tf_config(two, 2)})


@pytest.mark.parametrize(
    "index, flags, message",
    [
        (0, [], "multi-worker training (TF_CONFIG) needs --run-name"),
        (1, ["--run-name", "r"], "names this process worker 1 of 2 workers (not the chief: writes nothing): the flow runs on the chief"),
    ],
)
def test_the_flow_checks_the_cluster_before_any_stage(tmp_path, monkeypatch, capsys, index, flags, message):
    from tapeline.cli import main

    monkeypatch.setenv("TF_CONFIG", tf_config(["127.0.0.1:1", "127.0.0.1:2"], index))
    assert main(["train", "--storage", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_one_cpu_device_per_worker(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_config(["127.0.0.1:1", "127.0.0.1:2"], 0))
    assert check_cluster(["/GPU:0", "/GPU:1"], "r").workers == 2
    with pytest.raises(ConfigError, match="devices 2: with TF_CONFIG each worker trains on one CPU device"):
        check_cluster(["/CPU:0", "/CPU:1"], "r")


def test_joining_after_tensorflow_started_is_a_clear_error(tmp_path, monkeypatch):
    import tensorflow as tf
    from tensorflow.python.eager import context

    from tapeline.training.cluster import join_cluster

    tf.constant(1.0) + 1.0  # this process's TensorFlow runtime is up (as in any test process by now)
    assert context.context()._context_handle is not None
    monkeypatch.setenv("TF_CONFIG", tf_config(["127.0.0.1:1", "127.0.0.1:2"], 1))
    with pytest.raises(ConfigError, match="must set up before TensorFlow's runtime starts"):
        join_cluster(cluster_from_env(), Storage(str(tmp_path)), {"run_id": "late"}, ["/CPU:0"])


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_worker_waiting_for_its_chief(tmp_path, stop):
    """`kill` (SIGTERM) or Ctrl-C (SIGINT) a `tapeline worker` while it waits for its chief: one line, and exit status
    128 + the signal's number, 143 or 130."""
    command = [sys.executable, "-m", "tapeline.cli", "worker", "--storage", str(tmp_path), "--run-name", "r", "--wait", "600"]
    env = os.environ | {"TF_CONFIG": tf_config([f"127.0.0.1:{port}" for port in free_ports(2)], 1), "PYTHONUNBUFFERED": "1"}
    worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline() == "worker 1: waiting for run r's job from the chief\n"
        worker.send_signal(stop)
        _, err = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert worker.returncode == 128 + stop, err
    assert err.splitlines() == [f"tapeline worker: stopped by {stop.name}"]


JOIN = """
import sys
from tapeline.training.cluster import cluster_from_env, join_cluster
from tapeline.errors import TapelineError
from tapeline.storage.root import Storage
try:
    join_cluster(cluster_from_env(), Storage(sys.argv[1]), {"run_id": "mixed", "config": sys.argv[2]}, ["/CPU:0"])
except TapelineError as error:
    sys.exit(f"error: {error}")
"""


def test_workers_with_different_jobs_fail_instead_of_hanging(tmp_path):
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = {
        f"worker {index}": subprocess.Popen(
            [sys.executable, "-c", JOIN, str(tmp_path), f"epochs={index + 1}"],
            cwd=ROOT,
            env=os.environ | {"TF_CONFIG": tf_config(addresses, index)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for index in range(2)
    }
    outputs = finish(processes)
    for name, process in processes.items():
        assert process.returncode == 1, outcomes(processes, outputs)
        assert "error: the workers of run mixed hold different jobs" in outputs[name], outcomes(processes, outputs)
    assert json.loads(Layout(tmp_path).run("mixed").cluster_job.read_text())["config"] == "epochs=1"  # the chief's


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two TensorFlow worker processes need 2 CPU cores")
def test_two_workers_match_one(tmp_path):
    # 161 training samples, batches of 32: the last global batch has one sample, so worker 1's slice is empty.
    config, data = tiny_prepared(
        tmp_path, n_train=177, n_test=20, epochs=1, batch_size=32, seed=9, validation_size=16, snapshot_every=2, checkpoint_every=4,
        jit_compile=False,
    )  # fmt: skip
    assert "TF_CONFIG" not in os.environ
    one = train_model(config, data, "one")
    assert one.role == "single" and one.steps == 6

    # The chief runs train_model as the flow's train stage would; worker 1 is the real worker entry point.
    result = tmp_path / "chief.json"
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    scratch = tmp_path / "worker-tmp"  # the worker's TMPDIR: its throw-away checkpoints must be gone afterwards
    scratch.mkdir()

    def popen(index: int, umask: int) -> dict:
        # The worker creates files with mode 0600, the chief 0644: a file of the run made by the worker would show.
        environment = os.environ | {"TF_CONFIG": tf_config(addresses, index), "TMPDIR": str(scratch)}
        return dict(env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=lambda: os.umask(umask))

    worker = [sys.executable, "-m", "tapeline.cli", "worker", "--storage", config.storage, "--run-name", "two", "--wait", "120"]
    processes = {
        "chief": spawn_training(config, data, "two", tmp_path, result, **popen(0, 0o022)),
        "worker": subprocess.Popen(worker, cwd=ROOT, **popen(1, 0o077)),
    }
    outputs = finish(processes)
    assert all(process.returncode == 0 for process in processes.values()), outcomes(processes, outputs)
    assert "worker 0 of 2 workers (the chief)" in outputs["chief"]
    assert "worker 1 of 2 workers (not the chief: writes nothing)" in outputs["worker"]
    assert "trained 6 steps of run two (worker 1)" in outputs["worker"]
    two = TrainedModel(**json.loads(result.read_text()))
    assert two.role == "chief" and two.steps == one.steps and two.device == "/CPU:0 on each of 2 workers"

    # Only the chief wrote the run's files, and the worker left no temporary checkpoint behind.
    run_dir = Path(config.storage) / "runs" / "two"
    written = [p for p in run_dir.rglob("*")]
    assert written and all(stat.S_IMODE(p.stat().st_mode) & 0o044 for p in written), [p for p in written if not stat.S_IMODE(p.stat().st_mode) & 0o044]
    assert run_files(run_dir) - {RunPaths(run_dir).cluster_job.name} == run_files(Path(config.storage) / "runs" / "one")
    assert list(scratch.iterdir()) == []

    # The global batch is the single worker's: same samples, losses, gradients, and final weights.
    for trained in (one, two):
        publish_gradients(Storage(config.storage), trained)
    columns = ["step", "variable", "values"]
    expected, actual = (read_gradients(Path(t.gradients_uri).parent, columns=columns).sort_by([("step", "ascending")]) for t in (one, two))
    assert actual.column("step").to_pylist() == expected.column("step").to_pylist()
    assert actual.column("variable").equals(expected.column("variable"))
    for a, e in zip(actual.column("values").to_pylist(), expected.column("values").to_pylist()):
        np.testing.assert_allclose(a, e, rtol=1e-3, atol=1e-5)  # all-reduced sum across workers vs one: rounding only
    one_steps, two_steps = pq.read_table(one.steps_uri), pq.read_table(two.steps_uri)
    assert two_steps.column("sample_ids").equals(one_steps.column("sample_ids"))
    np.testing.assert_allclose(two_steps.column("loss").to_numpy(), one_steps.column("loss").to_numpy(), rtol=1e-3)
    np.testing.assert_allclose(two.epochs[0]["train_loss"], one.epochs[0]["train_loss"], rtol=1e-3)
    for name in ("train_accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(two.epochs[0][name], one.epochs[0][name], rtol=1e-3, err_msg=name)
    weights = [keras.models.load_model(t.model_uri, safe_mode=True).get_weights() for t in (one, two)]
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-4)
