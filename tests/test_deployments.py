"""The deployments, for real: deployments/stack.py brings up a Prefect server on a free
loopback port with a PREFECT_HOME of its own, plain workers outside the checkout run
`train-flow/on-demand`, and `stack.py down` stops what `up` started.

Every command runs the tapeline installed in the tests' environment (this checkout,
installed editable), with no PYTHONPATH and no TAPELINE_* variable."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.client.schemas.objects import StateType

from tapeline.cli import parse_train_args as parse_args
from tapeline.reader import read_gradients, read_run_json
from tapeline.registry.listing import model_registry
from tapeline.storage.root import Storage
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
STACK = [sys.executable, str(REPO / "deployments" / "stack.py")]
PREFECT = [sys.executable, "-m", "prefect"]


def _run(command: list[str], env: dict, timeout: float = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _alive(pid: int) -> bool:
    cmdline = Path(f"/proc/{pid}/cmdline")
    return cmdline.exists() and b"prefect" in cmdline.read_bytes()  # a reaped or reused pid is not ours


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """The environment of every command here: a new PREFECT_HOME and an API URL where nothing answers yet."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TAPELINE_")) and k != "PYTHONPATH"}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    yield env
    _run([*STACK, "down"], env)  # whatever the tests did


@pytest.fixture(scope="module")
def up(env) -> str:
    result = _run([*STACK, "up", "--no-worker"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def api(env, up):
    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        yield client


def _deployment_run(env: dict, *params: str) -> UUID:
    """`prefect deployment run 'train-flow/on-demand' --param ...`, as a user types it; the flow run's id."""
    command = [*PREFECT, "deployment", "run", "train-flow/on-demand"]
    for param in params:
        command += ["--param", param]
    result = _run(command, env)
    assert result.returncode == 0, result.stdout + result.stderr
    return UUID(re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1))


def _work_once(env: dict, cwd: Path) -> str:
    """A plain worker on the GPU queue, started in `cwd`, that takes the runs due now, waits for them, and exits."""
    command = [*PREFECT, "worker", "start", "--pool", "tapeline", "--work-queue", "gpu", "--run-once"]
    result = _run(command, env, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_up_starts_a_server_and_creates_what_the_deployments_need(up, env, api):
    assert f"server     started {env['PREFECT_API_URL']}" in up
    assert "work pool  'tapeline' created" in up and "limit      tag 'gpu' created: 1" in up
    assert api.read_work_pool("tapeline").type == "process"
    assert api.read_work_queue_by_name("gpu", work_pool_name="tapeline")
    assert api.read_work_queue_by_name("cpu", work_pool_name="tapeline")
    prepare = api.read_deployment_by_name("prepare-data/cpu")
    assert (prepare.work_pool_name, prepare.work_queue_name, prepare.entrypoint) == ("tapeline", "cpu", "tapeline.flows.prepare.prepare_data")
    assert api.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
    on_demand = api.read_deployment_by_name("train-flow/on-demand")
    assert (on_demand.work_pool_name, on_demand.work_queue_name) == ("tapeline", "gpu")
    assert on_demand.parameters == {} and on_demand.schedules == []
    # Nothing of the deploying machine: an installed module, no pull step, and the worker's own directory.
    scheduled, gc = api.read_deployment_by_name("train-flow/scheduled-retraining"), api.read_deployment_by_name("gc-flow/storage-gc")
    for deployment in (prepare, on_demand, scheduled, gc):
        assert deployment.entrypoint.startswith("tapeline.flows.") and ":" not in deployment.entrypoint
        assert (deployment.pull_steps, deployment.path, deployment.job_variables) == ([], None, {"working_dir": "."})


def test_the_server_up_started_keeps_a_week_of_events_and_vacuums_flow_runs_after_30_days(up, api):
    settings = api._client.get("/admin/settings").json()["server"]  # the running server's own
    assert settings["events"]["retention_period"] == "P7D"
    vacuum = settings["services"]["db_vacuum"]
    assert set(vacuum["enabled"]) == {"events", "flow_runs"} and vacuum["retention_period"] == "P30D"


def test_storage_gc_runs_weekly_on_the_cpu_queue_and_deletes(api):
    deployment = api.read_deployment_by_name("gc-flow/storage-gc")
    (schedule,) = deployment.schedules
    assert schedule.active and (schedule.schedule.cron, schedule.schedule.timezone) == ("0 5 * * 0", "UTC")
    assert (deployment.work_pool_name, deployment.work_queue_name) == ("tapeline", "cpu")
    assert deployment.parameters == {"keep_last": 7, "older_than": 14, "delete": True}
    assert deployment.global_concurrency_limit.limit == 1


def test_scheduled_retraining_is_nightly_in_utc_and_never_overlaps(api):
    deployment = api.read_deployment_by_name("train-flow/scheduled-retraining")
    (schedule,) = deployment.schedules
    assert schedule.active and (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "UTC")
    assert deployment.global_concurrency_limit.limit == 1
    assert (deployment.work_pool_name, deployment.work_queue_name) == ("tapeline", "gpu")
    assert deployment.parameters["epochs"] >= 1 and deployment.parameters["promotion_margin"] > 0
    assert deployment.parameters["warm_start"] is True
    assert deployment.parameters["exclude"] == "auto"


def _prepare_runs(api) -> dict:
    """The flow runs of prepare-data/cpu, by id."""
    deployment = api.read_deployment_by_name("prepare-data/cpu")
    return {run.id: run for run in api.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])))}


def _train_preparing_on_cpu(fashion_mnist_dir: Path, storage: Path, *flags: str) -> list[str]:
    """`tapeline train --prepare-on prepare-data/cpu`, run against the stack's server (PREFECT_API_URL)."""
    return [
        sys.executable, "-m", "tapeline.cli", "train", "--prepare-on", "prepare-data/cpu", "--dataset", "fashion-mnist",
        "--source", str(fashion_mnist_dir), "--storage", str(storage), "--epochs", "1", "--train-limit", "500", *flags,
    ]  # fmt: skip


def test_prepare_on_a_queue_no_worker_polls_gives_up_and_cancels_its_run(env, api, tmp_path, fashion_mnist_dir):
    """No worker serves the `cpu` queue: train-flow says so, waits --prepare-timeout seconds for one to pick its
    prepare-data run up, then fails with one line saying what to do, and cancels that run: no worker started later
    runs it."""
    assert api.read_work_queue_by_name("cpu", work_pool_name="tapeline").last_polled is None  # no worker, ever
    before = set(_prepare_runs(api))
    result = _run(_train_preparing_on_cpu(fashion_mnist_dir, tmp_path / "store", "--prepare-timeout", "2"), env)
    (run,) = [run for run_id, run in _prepare_runs(api).items() if run_id not in before]
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"waiting for a worker of work queue 'cpu' of pool 'tapeline' to pick up prepare-data/cpu run {run.name}" in output
    assert result.stderr.strip().splitlines()[-1] == (
        f"tapeline train: error: no worker picked up prepare-data/cpu run {run.name} within 2 s, so it is cancelled; "
        "no worker has ever polled work queue 'cpu' of pool 'tapeline': "
        "start one (prefect worker start --pool tapeline --work-queue cpu) or allow longer (--prepare-timeout)"
    )
    assert "Traceback" not in output
    assert run.state.type == StateType.CANCELLED
    assert not list((tmp_path / "store").rglob("*.parquet"))  # nothing was prepared here instead


def test_sigterm_while_waiting_for_a_worker_cancels_the_prepare_run(env, api, tmp_path, fashion_mnist_dir):
    """`kill` while train-flow waits for its prepare-data run: exit 143, and that run is cancelled, not left queued."""
    before = set(_prepare_runs(api))
    command = _train_preparing_on_cpu(fashion_mnist_dir, tmp_path / "store")  # the default timeout: minutes
    waiting = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("waiting for a worker of work queue 'cpu'" in line for line in lines) and waiting.poll() is None:
            lines.append(waiting.stderr.readline())
        waiting.send_signal(signal.SIGTERM)
        _, err = waiting.communicate(timeout=120)
    finally:
        waiting.kill()
    (run,) = [run for run_id, run in _prepare_runs(api).items() if run_id not in before]
    assert waiting.returncode == 143, "".join(lines) + err
    assert err.strip().splitlines()[-1] == "tapeline train: stopped by SIGTERM"
    assert run.state.type == StateType.CANCELLED


@pytest.mark.slow
def test_a_plain_worker_outside_the_checkout_runs_on_demand_and_registers_a_model(env, api, tmp_path, fashion_mnist_dir):
    """`prefect worker start --pool tapeline`, as a user types it, in a directory of its own: no clone, no TAPELINE_REPO,
    no PYTHONPATH. The run imports tapeline as installed ("installed" here is the tests' environment, which has this
    checkout installed editable), and its default storage is ./artifacts of the worker's directory, as for the CLI."""
    assert not {"TAPELINE_REPO", "TAPELINE_STORAGE", "PYTHONPATH"} & set(env)
    flow_run_id = _deployment_run(
        env,
        "dataset=fashion-mnist",
        f"source={fashion_mnist_dir}",
        "run_name=deployed",
        "epochs=1",
        "train_limit=500",
        "validation_size=100",
    )  # no storage: the default
    log = _work_once(env, cwd=tmp_path)
    assert api.read_flow_run(flow_run_id).state.type == StateType.COMPLETED, log
    storage = tmp_path / "artifacts"
    manifest = json.loads((storage / "runs" / "deployed" / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["parameters"]["train_limit"] == 500
    assert json.loads((storage / "models" / "current").read_text())["run_id"] == "deployed"
    assert [(row["run_id"], row["current"]) for row in model_registry(Storage(storage))] == [("deployed", True)]


@pytest.mark.slow
def test_stages_on_two_workers_that_share_only_a_bucket(env, api, s3, tmp_path, fashion_mnist_dir):
    """prepare-data on a `cpu` worker, training on a `gpu` worker: separate homes and working copies, one bucket."""
    root = s3.uri(f"two-workers-{tmp_path.name}")
    aws = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}

    def machine(name: str) -> dict:
        home = tmp_path / name
        home.mkdir(exist_ok=True)
        return {**env, **aws, "HOME": str(home), "TAPELINE_WORKDIR": str(home / "work")}

    cpu_worker = subprocess.Popen(
        [*PREFECT, "worker", "start", "--pool", "tapeline", "--work-queue", "cpu"], cwd=tmp_path / "cpu", env=machine("cpu"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        flow_run_id = _deployment_run(
            env, "dataset=fashion-mnist", f"source={fashion_mnist_dir}", f"storage={root}", "run_name=split",
            "epochs=1", "train_limit=500", "validation_size=100", "prepare_on=prepare-data/cpu",
        )  # fmt: skip
        log = _work_once(machine("gpu"), cwd=tmp_path / "gpu")
    finally:
        os.killpg(cpu_worker.pid, signal.SIGTERM)
        cpu_worker.wait(timeout=60)
    assert api.read_flow_run(flow_run_id).state.type == StateType.COMPLETED, log
    assert re.search(r"a worker picked up prepare-data/cpu run \S+; waiting for it to end", log), log  # then as long as it takes
    manifest = read_run_json(f"{root}/runs/split")
    assert manifest["uris"]["model"] == f"{root}/runs/split/model.keras"
    assert {"prepare-data", "download", "preprocess", "curate", "train", "export_gradients", "label_issues", "evaluate", "promote"} == set(manifest["stages"])
    # The GPU machine fetched and parsed nothing: the CPU machine did, into the bucket.
    assert manifest["stages"]["download"]["cached"] and manifest["stages"]["preprocess"]["cached"]
    assert list((tmp_path / "cpu" / "work").rglob("*.gz")) and not list((tmp_path / "gpu" / "work").rglob("*.gz"))
    assert not list((tmp_path / "cpu" / "work").rglob("model.keras"))  # and trained nothing
    steps = read_run_json(f"{root}/runs/split", "gradients.manifest.json")["steps"]
    norms = read_gradients(f"{root}/runs/split", columns=["step", "variable", "l2_norm"])  # from the bucket
    assert steps and norms.num_rows == len(steps) * 6


def test_invalid_parameter_is_refused_when_the_run_is_created(env, api, tmp_path, capsys):
    """A value that breaks a parameter's rule never becomes a run: the CLI exits before it starts one, and the API
    refuses `prefect deployment run … --param` (the deployment's parameter schema carries the rules of tapeline/config.py)."""
    storage = tmp_path / "storage"
    with pytest.raises(SystemExit):
        parse_args(["--epochs", "0", "--storage", str(storage)])  # the CLI's check, which exits with code 2
    assert capsys.readouterr().err.strip() == "tapeline train: error: epochs must be at least 1, got 0"

    deployment = api.read_deployment_by_name("train-flow/on-demand")
    assert deployment.enforce_parameter_schema
    runs = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]))
    before = len(api.read_flow_runs(flow_run_filter=runs))
    for param, reason in [
        ("epochs=0", "0 is less than the minimum of 1"),
        ("epochs=many", "'many' is not of type 'integer'"),
        ("gradient_dtype=float64", "'float64' is not one of ['float32', 'float16']"),
    ]:
        refused = _run([*PREFECT, "deployment", "run", "train-flow/on-demand", "--param", param, "--param", f"storage={storage}"], env)
        output = " ".join((refused.stdout + refused.stderr).split())
        field = param.split("=")[0]
        assert refused.returncode != 0 and f"Validation failed for field '{field}'. Failure reason: {reason}" in output, output
    assert len(api.read_flow_runs(flow_run_filter=runs)) == before
    assert not storage.exists()


def test_up_again_changes_nothing_then_down_stops_only_what_up_started(env):
    again = _run([*STACK, "up"], env)  # with a worker this time
    assert again.returncode == 0, again.stdout + again.stderr
    assert "server     using" in again.stdout and "'tapeline' exists" in again.stdout
    assert "tag 'gpu' exists" in again.stdout and "worker     started" in again.stdout
    state = Path(env["PREFECT_HOME"]) / "tapeline"
    pids = {name: int((state / f"{name}.pid").read_text()) for name in ("server", "worker")}
    assert all(_alive(pid) for pid in pids.values())

    down = _run([*STACK, "down"], env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"worker     stopped (pid {pids['worker']})" in down.stdout
    assert f"server     stopped (pid {pids['server']})" in down.stdout
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids.values())
    with pytest.raises(ConnectionRefusedError):  # the server's uvicorn child went with it
        socket.create_connection(("127.0.0.1", urlparse(env["PREFECT_API_URL"]).port), timeout=5)
    assert _run([*STACK, "down"], env).stdout.split() == ["worker", "not", "running", "server", "not", "running"]
