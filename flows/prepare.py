"""prepare-data: download -> preprocess on their own, for a worker other than the one that trains.

When one machine is not enough, a CPU worker fetches and parses the data and a GPU
worker trains. `train-flow --prepare-on prepare-data/cpu` runs this flow's
deployment on the `cpu` queue and waits for it; the train-flow's own download and
preprocess stages then find the results in the shared storage root (they are keyed
by content) and do no work. Nothing else passes between the two machines.
"""

from __future__ import annotations

import inspect
import time

from prefect import flow, get_client, task
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Cancelling

from tapeline import config as param  # the parameters' types: constraints and help
from tapeline.config import RunConfig
from tapeline.errors import TapelineError
from tapeline.tasks.download import download
from tapeline.tasks.failures import log_expected_failures_without_traceback
from tapeline.tasks.preprocess import preprocess
from tapeline.tasks.runs import with_parameter_help

log_expected_failures_without_traceback()


@flow(name="prepare-data", log_prints=True)
@with_parameter_help
def prepare_data(
    dataset: param.Dataset = RunConfig.dataset,
    source: param.Source = RunConfig.source,
    image_size: param.ImageSize = RunConfig.image_size,
    channels: param.Channels = RunConfig.channels,
    storage: param.StorageRoot = RunConfig.storage,
    refresh: param.Refresh = RunConfig.refresh,
    seed: param.Seed = RunConfig.seed,
    validation_size: param.ValidationSize = RunConfig.validation_size,
) -> dict:
    """Fetch, verify and preprocess a dataset into the storage root; returns where the splits are."""
    config = RunConfig(**locals()).validated()
    files = download(config.data, config.storage, config.refresh)
    data = preprocess(files, config.storage, config.seed, config.validation_size, config.refresh)
    print(f"{data.dataset}: {data.counts} in {data.directory}")
    return {"directory": data.directory, "counts": data.counts}


@task(name="prepare-data")
def prepare_elsewhere(config: RunConfig) -> None:
    """Run the `config.prepare_on` deployment of prepare-data with this run's data parameters, and wait for it.

    A worker must pick the run up within `config.prepare_timeout` seconds; once one has, it
    may take as long as it needs. A run that no worker picked up in time, or that this
    process stops waiting for (Ctrl-C, SIGTERM, an error), is cancelled: nothing stays
    queued for whichever worker starts next.
    """
    parameters = {name: getattr(config, name) for name in inspect.signature(prepare_data.fn).parameters}
    flow_run = run_deployment(config.prepare_on, parameters=parameters, timeout=0)
    with get_client(sync_client=True) as client:
        try:
            _wait_for_a_worker(client, flow_run, config)
            flow_run = _wait_for_the_end(client, flow_run)
        except BaseException:
            client.set_flow_run_state(flow_run.id, Cancelling(message="train-flow stopped waiting for it"))  # as `prefect flow-run cancel`
            raise
    if not flow_run.state.is_completed():
        raise TapelineError(f"{config.prepare_on} run {flow_run.name} ended {flow_run.state.name}")


POLL_SECONDS = 1.0
REMINDER_SECONDS = 60.0


def _wait_for_a_worker(client: SyncPrefectClient, flow_run: FlowRun, config: RunConfig) -> None:
    """Until a worker picks the run up (it leaves Scheduled, Late included); TapelineError after config.prepare_timeout."""
    queue = f"work queue {flow_run.work_queue_name!r} of pool {flow_run.work_pool_name!r}"
    print(f"waiting for a worker of {queue} to pick up {config.prepare_on} run {flow_run.name}")
    started = time.monotonic()
    reminder = started + REMINDER_SECONDS
    while client.read_flow_run(flow_run.id).state.is_scheduled():
        now = time.monotonic()
        if now >= started + config.prepare_timeout:
            raise TapelineError(_not_picked_up(client, flow_run, config))
        if now >= reminder:
            print(f"still waiting for a worker of {queue}: {now - started:.0f} s of {config.prepare_timeout:g}")
            reminder += REMINDER_SECONDS
        time.sleep(min(POLL_SECONDS, started + config.prepare_timeout - now))
    print(f"a worker picked up {config.prepare_on} run {flow_run.name}; waiting for it to end")


def _not_picked_up(client: SyncPrefectClient, flow_run: FlowRun, config: RunConfig) -> str:
    pool, queue = flow_run.work_pool_name, flow_run.work_queue_name
    polled = client.read_work_queue_by_name(queue, work_pool_name=pool).last_polled
    polls = f"a worker last polled work queue {queue!r} of pool {pool!r} at {polled:%H:%M:%S} UTC" if polled else (
        f"no worker has ever polled work queue {queue!r} of pool {pool!r}"
    )  # fmt: skip
    return (
        f"no worker picked up {config.prepare_on} run {flow_run.name} within {config.prepare_timeout:g} s, so it is cancelled; "
        f"{polls}: start one (prefect worker start --pool {pool} --work-queue {queue}) or allow longer (--prepare-timeout)"
    )


def _wait_for_the_end(client: SyncPrefectClient, flow_run: FlowRun) -> FlowRun:
    """Until the run, which a worker picked up, ends; as long as it takes."""
    while not (flow_run := client.read_flow_run(flow_run.id)).state.is_final():
        time.sleep(POLL_SECONDS)
    return flow_run


if __name__ == "__main__":
    prepare_data()
