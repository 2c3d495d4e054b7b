"""train-flow: download -> preprocess -> train (gpu) -> export gradients -> evaluate -> promote.

Run it locally with `python flows/train.py --help` (flows/cli.py reads the flags); with no PREFECT_API_URL set,
Prefect starts a temporary local API for the run. Stages hand each other small
references (storage URIs, digests, counts), never arrays: every stage reads and
writes files under the storage root (a directory or a bucket), so any stage can
run on another machine.
"""

from __future__ import annotations

import dataclasses
import os
import sys

if __name__ == "__main__":  # `python flows/train.py`: the flags first, before the imports below take seconds
    from flows.cli import main

    sys.exit(main())

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry, and no errors offline
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

from prefect import flow  # noqa: E402

from flows.prepare import prepare_elsewhere  # noqa: E402
from tasks.champion import warm_start_champion  # noqa: E402
from tasks.cluster import check_cluster  # noqa: E402
from tasks.config import ConfigError, RunConfig, TapelineError, log_expected_failures_without_traceback  # noqa: E402
from tasks.devices import resolve_devices  # noqa: E402
from tasks.download import download  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.export import export_gradients  # noqa: E402
from tasks.lease import RunLease, RunLeaseHeld  # noqa: E402
from tasks.manifest import StageClock, choose_run_id, flow_run_name, run_manifest_uri, tag_flow_run, write_run_manifest  # noqa: E402
from tasks.preprocess import preprocess  # noqa: E402
from tasks.promote import promote, publish_model_registry  # noqa: E402
from tasks.storage import Storage, utc_now  # noqa: E402
from tasks.train import NonFiniteError, train  # noqa: E402

log_expected_failures_without_traceback()


@flow(name="train-flow", flow_run_name=flow_run_name, log_prints=True)
def train_flow(
    dataset: str = RunConfig.dataset,
    source: str | None = RunConfig.source,
    storage: str | None = RunConfig.storage,
    run_name: str | None = RunConfig.run_name,
    prepare_on: str | None = RunConfig.prepare_on,
    refresh: bool = RunConfig.refresh,
    epochs: int = RunConfig.epochs,
    batch_size: int = RunConfig.batch_size,
    learning_rate: float = RunConfig.learning_rate,
    seed: int = RunConfig.seed,
    train_limit: int | None = RunConfig.train_limit,
    validation_size: int = RunConfig.validation_size,
    snapshot_every: int = RunConfig.snapshot_every,
    snapshot_weights: bool = RunConfig.snapshot_weights,
    gradient_dtype: str = RunConfig.gradient_dtype,
    spike_factor: float = RunConfig.spike_factor,
    checkpoint_every: int = RunConfig.checkpoint_every,
    promotion_margin: float = RunConfig.promotion_margin,
    warm_start: bool = RunConfig.warm_start,
    precision: str = RunConfig.precision,
    jit_compile: bool = RunConfig.jit_compile,
    deterministic: bool = RunConfig.deterministic,
    device: str = RunConfig.device,
    devices: int = RunConfig.devices,
) -> dict:
    """Train the tf.GradientTape CNN on (Fashion-)MNIST and persist its gradients; returns the run manifest."""
    config = RunConfig(**locals()).validated()  # the parameters are exactly RunConfig's fields
    check_where_to_train(config)  # fail before any stage runs
    run_id, started = choose_run_id(config.run_name), utc_now()
    tag_flow_run(f"dataset:{config.dataset}")
    with RunLease(Storage(config.storage), run_id) as lease:  # one writer per run: a second process stops here
        return run_pipeline(config, run_id, started, StageClock(before_each=lease.check))


def run_pipeline(config: RunConfig, run_id: str, started: str, stages: StageClock) -> dict:
    """The stages, in order, for one run; its lease held."""
    # Chosen once, up front: a champion promoted while this run trains must not change where it started.
    champion = warm_start_champion(Storage(config.storage), config.dataset) if config.warm_start else None
    if config.warm_start and champion is None:
        print(f"warm start: no champion trained on {config.dataset} yet; starting from random weights")

    if config.prepare_on:  # on another worker; the two stages below then find its results in storage
        stages.run(prepare_elsewhere, config)
    here = dataclasses.replace(config, refresh=config.refresh and not config.prepare_on)  # a refresh happened there
    files = stages.run(download, here)
    data = stages.run(preprocess, here, files)
    try:
        trained = stages.run(train, config, data, run_id, champion)
    except NonFiniteError as error:
        stages.run(export_gradients, config, error.trained)  # the failing step's gradients: the snapshot most needed
        raise
    exported = stages.run(export_gradients, config, trained)
    scores = stages.run(evaluate, config, trained, data)
    print(f"test accuracy {scores['accuracy']:.4f} on {scores['samples']} samples")
    promotion = stages.run(promote, config, trained, scores)

    manifest = write_run_manifest(config, run_id, started, files, data, trained, exported, scores, promotion, stages.record)
    publish_model_registry(config.storage)  # after run.json: the registry lists this run too
    return manifest


def check_where_to_train(config: RunConfig) -> None:
    """Devices and, under TF_CONFIG, the cluster: a ConfigError now, before any stage runs."""
    cluster = check_cluster(resolve_devices(config.device, config.devices), config.run_name)
    if cluster and not cluster.chief:
        raise ConfigError(f"TF_CONFIG names this process {cluster}: the flow runs on the chief, the others run python -m tasks.worker")


def main(parameters: dict) -> int:
    """Run the flow with the parameters flows/cli.py read; an expected failure ends in one line saying what to do."""
    try:
        check_where_to_train(RunConfig(**parameters).validated())  # needs TensorFlow, so not in flows/cli.py
    except ConfigError as error:
        return _failed(2, error)
    try:
        try:
            manifest = train_flow(**parameters)
        finally:
            _stop_temporary_api()
    except RunLeaseHeld as error:  # nothing was written: like a bad flag, a matter of what was asked
        return _failed(2, error)
    except TapelineError as error:
        return _failed(1, error)
    print(run_manifest_uri(manifest["parameters"]["storage"], manifest["run_id"]))
    return 0


def _failed(code: int, error: TapelineError) -> int:
    print(f"flows/train.py: error: {error}", file=sys.stderr)
    return code


def _stop_temporary_api() -> None:
    """Prefect's background services (events, API logs) drain at exit and, without PREFECT_API_URL, it stops the
    temporary API it ran the flow on then: each can print a line after our last one. Drain and stop them now."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    APILogHandler().flush()
    EventsWorker.drain_all()
    if not PREFECT_API_URL.value():  # a real API (or a test harness's) is not ours to stop
        SubprocessASGIServer().stop()  # the one Prefect started, if it started one
