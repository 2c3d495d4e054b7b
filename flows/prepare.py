"""prepare-data: download -> preprocess on their own, for a worker other than the one that trains.

When one machine is not enough, a CPU worker fetches and parses the data and a GPU
worker trains. `train-flow --prepare-on prepare-data/cpu` runs this flow's
deployment on the `cpu` queue and waits for it; the train-flow's own download and
preprocess stages then find the results in the shared storage root (they are keyed
by content) and do no work. Nothing else passes between the two machines.
"""

from __future__ import annotations

import inspect
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, task  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402

from tapeline import config as param  # noqa: E402  (the parameters' types: constraints and help)
from tapeline.config import RunConfig  # noqa: E402
from tapeline.errors import TapelineError  # noqa: E402
from tapeline.tasks.download import download  # noqa: E402
from tapeline.tasks.failures import log_expected_failures_without_traceback  # noqa: E402
from tapeline.tasks.preprocess import preprocess  # noqa: E402
from tapeline.tasks.runs import with_parameter_help  # noqa: E402

log_expected_failures_without_traceback()


@flow(name="prepare-data", log_prints=True)
@with_parameter_help
def prepare_data(
    dataset: param.Dataset = RunConfig.dataset,
    source: param.Source = RunConfig.source,
    storage: param.StorageRoot = RunConfig.storage,
    refresh: param.Refresh = RunConfig.refresh,
    seed: param.Seed = RunConfig.seed,
    validation_size: param.ValidationSize = RunConfig.validation_size,
) -> dict:
    """Fetch, verify and preprocess a dataset into the storage root; returns where the splits are."""
    config = RunConfig(**locals()).validated()
    files = download(config.dataset, config.source, config.storage, config.refresh)
    data = preprocess(files, config.storage, config.seed, config.validation_size, config.refresh)
    print(f"{data.dataset}: {data.counts} in {data.directory}")
    return {"directory": data.directory, "counts": data.counts}


@task(name="prepare-data")
def prepare_elsewhere(config: RunConfig) -> None:
    """Run the `config.prepare_on` deployment of prepare-data with this run's data parameters, and wait for it."""
    parameters = {name: getattr(config, name) for name in inspect.signature(prepare_data.fn).parameters}
    flow_run = run_deployment(config.prepare_on, parameters=parameters)
    if not flow_run.state or not flow_run.state.is_completed():
        raise TapelineError(f"{config.prepare_on} run {flow_run.name} ended {flow_run.state.name if flow_run.state else 'without a state'}")


if __name__ == "__main__":
    prepare_data()
