"""Bring tapeline's deployments up on this machine, or take down what that started.

    python deployments/stack.py up [--no-worker]
    python deployments/stack.py down

`up` is idempotent. It uses the Prefect API at PREFECT_API_URL (environment or active
profile) when it answers; otherwise it starts `prefect server start` on loopback in the
background, with the database retention of SERVER_RETENTION. Then it creates the process work pool `tapeline` with its work queue `gpu`
and the `gpu` tag concurrency limit when they are missing, deploys
deployments/prefect.yaml, and starts a worker for the pool unless `--no-worker`.
The deployments run the tapeline installed in this Python environment (module-path
entrypoints); the worker `up` starts works in this clone, so a run's default storage
root is the clone's ./artifacts.

`down` stops only the server and worker that `up` started (their pid files), and
nothing else. Pid files and logs live in $PREFECT_HOME/tapeline/ (~/.prefect/tapeline).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import tapeline.flows  # noqa: F401  (the environment's defaults, before Prefect loads)

# isort: split
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.workers.process import ProcessWorker

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = "deployments/prefect.yaml"  # relative to REPO, where `prefect deploy` runs
POOL, QUEUES, GPU_TAG = "tapeline", ("gpu", "cpu"), "gpu"  # training on gpu; prepare-data/cpu on cpu
DEFAULT_PORT = 4200  # Prefect's own default, so the usual URL works when it is free
PREFECT = [sys.executable, "-m", "prefect"]  # the CLI of this very environment
# What the database of the server `up` starts keeps (docs/deployments.md#what-the-prefect-database-keeps), as ISO 8601
# durations; a variable already in the environment wins.
SERVER_RETENTION = {
    "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": "P7D",  # events: the event feed, automations' triggers
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",  # vacuum old events, and old flow runs
    "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": "P30D",  # a flow run, its logs and artifacts: 30 days after it ended
}


def state_dir() -> Path:
    return Path(get_current_settings().home).expanduser() / "tapeline"


def configured_api_url() -> str | None:
    url = get_current_settings().api.url
    return str(url).rstrip("/") if url else None


def client(url: str) -> SyncPrefectClient:
    return SyncPrefectClient(url, api_key=get_current_settings().api.key)


def healthy(url: str) -> bool:
    with client(url) as api:
        return api.api_healthcheck() is None


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_port() -> int:
    """Prefect's default port when it is free, else any free one (stack.py runs from a clone, without tests/)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the server: a stopped one's TIME_WAIT is no conflict
        try:
            probe.bind(("127.0.0.1", DEFAULT_PORT))
        except OSError:
            probe.bind(("127.0.0.1", 0))  # taken: any free port
        return probe.getsockname()[1]


def running(name: str) -> int | None:
    """The pid of the process `up` started as `name`, if it is still that process."""
    try:
        pid = int((state_dir() / f"{name}.pid").read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and b"prefect" not in cmdline.read_bytes():
        return None  # the pid now belongs to an unrelated process
    return pid


def start(name: str, command: list[str], env: dict) -> int:
    """Start `command` in the background, in a session of its own so `down` can stop its children too."""
    log = state_dir() / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    (state_dir() / f"{name}.pid").write_text(f"{process.pid}\n")
    return process.pid


def child_env(url: str) -> dict:
    return {**os.environ, "PREFECT_API_URL": url}


def ensure_server() -> str:
    url = configured_api_url()
    recorded = state_dir() / "server.url"
    if url is None and running("server") and recorded.exists():
        url = recorded.read_text().strip()
    if url and healthy(url):
        print(f"server     using {url}")
        return url
    if url and not is_loopback(url):
        sys.exit(f"stack.py: error: no Prefect API answers at {url}; start it, or unset PREFECT_API_URL to run one here")
    if not running("server"):
        port = urlparse(url).port if url else server_port()
        url = f"http://127.0.0.1:{port}/api"
        command = [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        pid = start("server", command, {**SERVER_RETENTION, **child_env(url)})
        recorded.write_text(url + "\n")
        print(f"server     started {url} (pid {pid}, log {state_dir() / 'server.log'})")
    deadline = time.monotonic() + 180  # migrations on a new database take a while on a small machine
    while not healthy(url):
        if not running("server"):
            sys.exit(f"stack.py: error: the server exited; see {state_dir() / 'server.log'}")
        if time.monotonic() > deadline:
            sys.exit(f"stack.py: error: the server is not healthy after 180 s; see {state_dir() / 'server.log'}")
        time.sleep(1)
    print("server     healthy")
    return url


def ensure_pool_queue_and_limit(url: str) -> None:
    with client(url) as api:
        try:
            api.read_work_pool(POOL)
            print(f"work pool  {POOL!r} exists")
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            api.create_work_pool(WorkPoolCreate(name=POOL, type="process", base_job_template=template))
            print(f"work pool  {POOL!r} created (type process)")
        for queue in QUEUES:
            try:
                api.read_work_queue_by_name(queue, work_pool_name=POOL)
                print(f"work queue {queue!r} exists")
            except ObjectNotFound:
                api.create_work_queue(queue, work_pool_name=POOL)
                print(f"work queue {queue!r} created")
        try:
            limit = api.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit
            print(f"limit      tag {GPU_TAG!r} exists: {limit} task(s) at a time")  # left as the user set it
        except ObjectNotFound:
            api.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=1)
            print(f"limit      tag {GPU_TAG!r} created: 1 task at a time")


def deploy(url: str) -> None:
    command = [*PREFECT, "--no-prompt", "deploy", "--prefect-file", PREFECT_FILE, "--all"]
    result = subprocess.run(command, cwd=REPO, env=child_env(url), capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{result.stdout}{result.stderr}stack.py: error: `prefect deploy` failed (above)")
    print("deployed   train-flow/on-demand, train-flow/scheduled-retraining, prepare-data/cpu, gc-flow/storage-gc")


def ensure_worker(url: str) -> None:
    if pid := running("worker"):
        print(f"worker     running (pid {pid})")
        return
    command = [*PREFECT, "worker", "start", "--pool", POOL, *(f"--work-queue={queue}" for queue in QUEUES)]
    pid = start("worker", command, child_env(url))  # in REPO: runs write to the clone's ./artifacts
    print(f"worker     started for pool {POOL!r}, queues {', '.join(QUEUES)} (pid {pid}, log {state_dir() / 'worker.log'})")


def up(with_worker: bool) -> None:
    state_dir().mkdir(parents=True, exist_ok=True)
    url = ensure_server()
    ensure_pool_queue_and_limit(url)
    deploy(url)
    if with_worker:
        ensure_worker(url)
    print(
        "\nNext:\n"
        + (f"  export PREFECT_API_URL={url}\n" if configured_api_url() != url else "")
        + "  prefect deployment run 'train-flow/on-demand' --param epochs=1\n"
        + ("" if with_worker else f"  prefect worker start --pool {POOL} --work-queue gpu --work-queue cpu   # where runs should write\n")
        + f"  UI: {url.removesuffix('/api')}\n"
        + "  take it down: python deployments/stack.py down"
    )


def stop(name: str) -> None:
    pid = running(name)
    if pid is None:
        print(f"{name:<10} not running")
    else:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while running(name) and time.monotonic() < deadline:
            time.sleep(0.2)
        if running(name):
            os.killpg(pid, signal.SIGKILL)
        print(f"{name:<10} stopped (pid {pid})")
    (state_dir() / f"{name}.pid").unlink(missing_ok=True)


def down() -> None:
    stop("worker")  # first, so it does not lose its server mid-run
    stop("server")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deployments/stack.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start what is missing, deploy").add_argument(
        "--no-worker", action="store_true", help="do not start a worker (run one yourself, e.g. on the GPU machine)"
    )
    commands.add_parser("down", help="stop the server and worker that `up` started")
    args = parser.parse_args(argv)
    if args.command == "up":
        up(with_worker=not args.no_worker)
    else:
        down()


if __name__ == "__main__":
    main()
