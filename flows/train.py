"""train-flow: download -> preprocess -> train (gpu) -> export gradients -> evaluate -> promote.

The wiring of the pipeline, and nothing else: every stage is a task of tasks/, and
every task a thin call into the tapeline library. Stages hand each other small
references (storage URIs, digests, counts), never arrays: each reads and writes
files under the storage root (a directory or a bucket), so any stage can run on
another machine. `python flows/train.py --help` (or `tapeline train --help`) lists
the parameters; with no PREFECT_API_URL set, Prefect starts a temporary local API.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # `python flows/train.py`: the flags first, before the imports below take seconds
    from tapeline.cli import train as command

    sys.exit(command(sys.argv[1:], prog="flows/train.py"))


from prefect import flow
from prefect.exceptions import TerminationSignal

from tapeline import config as param  # the parameters' types: constraints and help
from tapeline.config import RunConfig
from tapeline.curation.exclusion import ExclusionChoice, choose_exclusion
from tapeline.data.sources import data_shape
from tapeline.errors import ConfigError, NonFiniteError, TapelineError
from tapeline.flows.prepare import prepare_elsewhere
from tapeline.manifest import completed_run, final_metrics, run_manifest_uri, write_run_manifest
from tapeline.model import check_determinism, check_model, model_record
from tapeline.registry.champion import current_champion
from tapeline.registry.retention import drop_checkpoints
from tapeline.registry.warm_start import WarmStartChoice, choose_warm_start
from tapeline.storage.lease import RunLease, RunLeaseHeld
from tapeline.storage.root import Storage, utc_now
from tapeline.storage.versioned import require_conditional_writes
from tapeline.tasks.curation import curate
from tapeline.tasks.download import download
from tapeline.tasks.evaluate import evaluate
from tapeline.tasks.export import export_gradients
from tapeline.tasks.failures import log_expected_failures_without_traceback
from tapeline.tasks.label_issues import report_label_issues
from tapeline.tasks.preprocess import preprocess
from tapeline.tasks.promote import promote, publish_model_registry
from tapeline.tasks.runs import StageClock, choose_run_id, flow_run_name, tag_flow_run, with_parameter_help
from tapeline.tasks.train import train
from tapeline.training.devices import check_placement
from tapeline.training.loop import coupling
from tapeline.training.summaries import write_run_metrics

log_expected_failures_without_traceback()


@flow(name="train-flow", flow_run_name=flow_run_name, log_prints=True)
@with_parameter_help
def train_flow(
    dataset: param.Dataset = RunConfig.dataset,
    source: param.Source = RunConfig.source,
    image_size: param.ImageSize = RunConfig.image_size,
    channels: param.Channels = RunConfig.channels,
    model: param.Model = RunConfig.model,
    storage: param.StorageRoot = RunConfig.storage,
    run_name: param.RunName = RunConfig.run_name,
    prepare_on: param.PrepareOn = RunConfig.prepare_on,
    prepare_timeout: param.PrepareTimeout = RunConfig.prepare_timeout,
    refresh: param.Refresh = RunConfig.refresh,
    epochs: param.Epochs = RunConfig.epochs,
    batch_size: param.BatchSize = RunConfig.batch_size,
    learning_rate: param.LearningRate = RunConfig.learning_rate,
    seed: param.Seed = RunConfig.seed,
    train_limit: param.TrainLimit = RunConfig.train_limit,
    validation_size: param.ValidationSize = RunConfig.validation_size,
    snapshot_every: param.SnapshotEvery = RunConfig.snapshot_every,
    snapshot_weights: param.SnapshotWeights = RunConfig.snapshot_weights,
    gradient_dtype: param.GradientDtype = RunConfig.gradient_dtype,
    spike_factor: param.SpikeFactor = RunConfig.spike_factor,
    checkpoint_every: param.CheckpointEvery = RunConfig.checkpoint_every,
    keep_checkpoints: param.KeepCheckpoints = RunConfig.keep_checkpoints,
    promotion_margin: param.PromotionMargin = RunConfig.promotion_margin,
    warm_start: param.WarmStart = RunConfig.warm_start,
    warm_start_from: param.WarmStartFrom = RunConfig.warm_start_from,
    exclude: param.Exclude = RunConfig.exclude,
    precision: param.Precision = RunConfig.precision,
    jit_compile: param.JitCompile = RunConfig.jit_compile,
    steps_per_call: param.StepsPerCall = RunConfig.steps_per_call,
    per_example_norms: param.PerExampleNorms = RunConfig.per_example_norms,
    deterministic: param.Deterministic = RunConfig.deterministic,
    device: param.Device = RunConfig.device,
    devices: param.Devices = RunConfig.devices,
    accept_unlocked_storage: param.AcceptUnlockedStorage = RunConfig.accept_unlocked_storage,
) -> dict:
    """Train a model (the tf.GradientTape example's CNN by default) on a dataset and persist its gradients; returns the run manifest."""
    config = RunConfig(**locals()).validated()  # the parameters are exactly RunConfig's fields
    built = check_before_any_stage(config)
    run_id, started = choose_run_id(config.run_name), utc_now()
    tag_flow_run(f"dataset:{config.dataset}")
    if (done := completed(config, run_id)) is not None:  # history: before anything is written, the lease included
        return done
    # Chosen once, up front: a champion promoted while this run trains must not change where it started.
    start = choose_warm_start(Storage(config.storage), config.warm_start, config.warm_start_from, built["variables"])
    exclusion = choose_exclusion(Storage(config.storage), config.exclude)  # the same: a champion promoted later changes nothing
    with RunLease(Storage(config.storage), run_id) as lease:  # one writer per run: a second process stops here
        try:  # again under the lease: the process that held it a moment ago may have completed the run
            return completed(config, run_id) or run_pipeline(config, run_id, started, start, StageClock(before_each=lease.check), exclusion)
        except (KeyboardInterrupt, TerminationSignal):  # Ctrl-C, SIGTERM, a cancel: the lease is released on the way out
            print(f"run {run_id} stopped; run it again (--run-name {run_id}) to resume from its last checkpoint")
            raise


def completed(config: RunConfig, run_id: str) -> dict | None:
    """The manifest of the run if it is complete, said in one line; refused (ConfigError) if with other parameters."""
    manifest = completed_run(config, run_id)
    if manifest is not None:
        print(f"run {run_id!r} is complete (finished {manifest['finished']}): nothing trained or written")
    return manifest


def run_pipeline(
    config: RunConfig, run_id: str, started: str, start: WarmStartChoice | None, stages: StageClock, exclusion: ExclusionChoice | None = None
) -> dict:
    """The stages, in order, for one run whose lease is held; `start`: what a warm start may start from; `exclusion`:
    what `exclude` may leave out."""
    storage = config.storage
    if note := config.training_split().limit_note():
        print(note)
    if config.prepare_on:  # on another worker; the two stages below then find its results in storage
        stages.run(prepare_elsewhere, config)
    refresh = config.refresh and not config.prepare_on  # a refresh there is not repeated here

    files = stages.run(download, config.data, storage, refresh)
    data = stages.run(preprocess, files, storage, config.seed, config.validation_size, refresh)
    warm_start = start.record(files.train_set) if start else None  # the training data is known now
    if warm_start and warm_start["from"] is None:
        print(f"warm start: {warm_start['reason']}; starting from random weights")
    exclusion = exclusion or ExclusionChoice(None, None, "none asked for")
    curation = stages.run(curate, storage, run_id, exclusion, files.train_set, data.uris["train"], config.train_limit)
    try:
        trained = stages.run(train, config, data, run_id, warm_start, curation)
    except NonFiniteError as error:
        stages.run(export_gradients, storage, error.trained, data.uris["train"], files.classes)  # the failing step's gradients: the snapshot most needed
        raise
    exported = stages.run(export_gradients, storage, trained, data.uris["train"], files.classes)
    issues = None
    if trained.model["per_example"]["norms"]:
        issues = stages.run(report_label_issues, storage, run_id, data.uris["train"], files.classes, trained.epochs)
    scores = stages.run(evaluate, storage, trained.model_uri, data.uris["test"], config.model)
    print(f"test accuracy {scores['accuracy']:.4f} on {scores['samples']} samples")
    write_run_metrics(Storage(storage), run_id, trained.steps, final_metrics(scores, exported))  # TensorBoard
    promotion = stages.run(promote, storage, run_id, files, trained.model_uri, scores["accuracy"], config.promotion_margin)

    manifest = write_run_manifest(config, run_id, started, files, data, trained, exported, scores, promotion, stages.record, curation, issues)
    if not config.keep_checkpoints:  # a completed run is never resumed
        print(f"dropped the run's checkpoints: {drop_checkpoints(Storage(storage), run_id):,} bytes")
    publish_model_registry(storage)  # after run.json: the registry lists this run too
    return manifest


def check_before_any_stage(config: RunConfig) -> dict:
    """What a run needs beyond its parameters' own rules: a model that takes the data, devices and cluster, and a
    store that keeps writers apart, whose champion pointer reads. Returns the model's record (run.json's `model`), as
    built for the data."""
    model = check_model(config.model, data_shape(config), config.precision)
    check_determinism(config.model, model, config.deterministic, config.jit_compile)
    if config.devices > 1 and (coupled := coupling(model)[1]):
        raise ConfigError(f"--devices {config.devices} would train another model than one device: {coupled}; train on one device")
    check_placement(config)
    require_conditional_writes(config.storage, config.accept_unlocked_storage)
    current_champion(Storage(config.storage))  # a pointer that cannot be read stops the run here, not at its promotion
    return model_record(config.model, model)


def main(parameters: dict, prog: str) -> int:
    """`tapeline train`: run the flow with the parameters tapeline/cli.py read and checked.

    The last line is the run's run.json (a completed run's, rerun with its parameters: nothing is done). An
    expected failure ends in one line saying what to do: exit 2 when nothing was done (devices, cluster, a run held
    by another process, a completed run asked for with other parameters, bad data), 1 when a stage failed.
    """
    try:
        config = RunConfig(**parameters).validated()
        check_before_any_stage(config)  # needs TensorFlow, so not in tapeline/cli.py
    except TapelineError as error:  # nothing was done
        return _failed(prog, 2, error)
    try:
        try:
            manifest = train_flow(**parameters)
        finally:
            _stop_temporary_api()
    except (ConfigError, RunLeaseHeld) as error:
        return _failed(prog, 2, error)
    except TapelineError as error:
        return _failed(prog, 1, error)
    print(run_manifest_uri(config.storage, manifest["run_id"]))
    return 0


def _failed(prog: str, code: int, error: TapelineError) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
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
