"""Multi-worker training: `TF_CONFIG` -> `MultiWorkerMirroredStrategy`, who is chief, what the chief hands the others.

`TF_CONFIG` (the variable TensorFlow's own cluster resolver reads) names the
cluster and this process's place in it:

    {"cluster": {"worker": ["host-0:2222", "host-1:2222"]}, "task": {"type": "worker", "index": 1}}

With more than one task of type `chief` or `worker`, training runs the same loop
under `MultiWorkerMirroredStrategy`: every worker reads the same prepared data
and takes its slice of every global batch; the gradients are all-reduced, so the
global batch and the exported gradient are a single-worker run's. The chief (the
`chief` task, else worker 0) writes the run's files; the others take part in
every collective and write nothing.

The chief is the process that runs the flow (its `train` stage). Before joining
the cluster it writes `runs/<run_id>/cluster.json`: the run's config, prepared
data and warm start. The other workers (`python -m tapeline.training.worker`) wait for that
file, so they train exactly the chief's job, and after joining, all workers
compare a digest of it: a worker holding another job fails at once instead of
hanging in a collective.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tapeline.errors import ConfigError, TapelineError
from tapeline.storage.layout import Layout
from tapeline.storage.root import Storage

TF_CONFIG = "TF_CONFIG"
_strategy = None  # one per process: the collective runtime is set up once, before TensorFlow starts


@dataclass(frozen=True)
class Cluster:
    """This process's place in a multi-worker cluster that `TF_CONFIG` names."""

    task_type: str  # chief or worker
    task_id: int
    workers: int  # tasks that train: the chief (if any) and the workers
    chief: bool  # writes the run's files
    spec: dict  # TF_CONFIG's cluster

    def __str__(self) -> str:
        role = "the chief" if self.chief else "not the chief: writes nothing"
        return f"{self.task_type} {self.task_id} of {self.workers} workers ({role})"


def cluster_from_env(environ=os.environ) -> Cluster | None:
    """The cluster `TF_CONFIG` names, or None when it names none or a single worker (one-machine training)."""
    text = environ.get(TF_CONFIG, "").strip()
    if not text:
        return None
    try:
        tf_config = json.loads(text)
        spec = {job: list(tasks) for job, tasks in tf_config.get("cluster", {}).items()}
    except (ValueError, TypeError, AttributeError):
        raise ConfigError(f"{TF_CONFIG} is not a JSON object with a 'cluster' of job names to address lists") from None
    training = len(spec.get("chief", [])) + len(spec.get("worker", []))
    if training <= 1:
        return None
    unsupported = sorted(set(spec) - {"chief", "worker"})
    if unsupported:
        raise ConfigError(f"{TF_CONFIG}: jobs {', '.join(unsupported)} are not supported (only chief and worker)")
    if len(spec.get("chief", [])) > 1:
        raise ConfigError(f"{TF_CONFIG}: a cluster has at most one chief, got {len(spec['chief'])}")
    task = tf_config.get("task") or {}
    task_type, task_id = task.get("type"), task.get("index", 0)
    if task_type not in spec or not isinstance(task_id, int) or not 0 <= task_id < len(spec[task_type]):
        raise ConfigError(f"{TF_CONFIG}: task {task!r} is not in the cluster {spec!r}")
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in spec)
    return Cluster(task_type, task_id, training, chief, spec)


def check_cluster(devices: list[str], run_name: str | None) -> Cluster | None:
    """The cluster `TF_CONFIG` names, checked before any work against this worker's devices and the run's name."""
    cluster = cluster_from_env()
    if cluster and len(devices) > 1 and not devices[0].startswith("/GPU"):
        raise ConfigError(f"devices {len(devices)}: with {TF_CONFIG} each worker trains on one CPU device (add workers instead)")
    if cluster and not run_name:
        raise ConfigError(f"multi-worker training ({TF_CONFIG}) needs --run-name: the other workers join the run by its name")
    return cluster


def job_file(storage: Storage, run_id: str) -> Path:
    """What the chief hands the other workers."""
    return storage.layout.run(run_id).cluster_job


def join_cluster(cluster: Cluster, storage: Storage, job: dict, devices: list[str]):
    """The `MultiWorkerMirroredStrategy` of this process; on the chief, publish `job` for the other workers first.

    Creating the strategy starts this task's server and waits until every task of
    the cluster has joined. It must come before TensorFlow's runtime starts in this
    process (it configures the collective ops); later is a ConfigError.
    """
    global _strategy
    if cluster.chief:
        storage.write_json(job_file(storage, job["run_id"]), job | {"cluster": cluster.spec})
    if _strategy is None:
        _strategy = _create_strategy(cluster, devices)
    print(f"multi-worker training: {cluster}")
    _check_same_job(_strategy, job)
    return _strategy


def wait_for_job(storage: Storage, run_id: str, timeout: float, poll: float = 1.0) -> dict:
    """The job the chief published for run `run_id` (a non-chief worker's first step)."""
    path = job_file(storage, run_id)
    deadline = time.monotonic() + timeout
    while not storage.exists(path):
        if time.monotonic() > deadline:
            raise TapelineError(f"no {storage.uri_of(path)} after {timeout:.0f} s: is the chief running run {run_id}?")
        time.sleep(poll)
    return storage.read_json(path)


def job_for(config, data, run_id: str, warm_start: dict | None, curation: dict | None = None) -> dict:
    """What every worker must agree on: the run's config, its prepared data, its warm start, the examples it leaves out."""
    return {
        "run_id": run_id, "config": dataclasses.asdict(config), "data": dataclasses.asdict(data),
        "warm_start": warm_start, "curation": curation,
    }  # fmt: skip


def _create_strategy(cluster: Cluster, devices: list[str]):
    import tensorflow as tf
    from tensorflow.python.eager import context

    if context.context()._context_handle is not None:  # what configure_collective_ops refuses
        raise ConfigError(
            f"multi-worker training ({TF_CONFIG}) must set up before TensorFlow's runtime starts, "
            "and this process has already run TensorFlow: start training in a fresh process"
        )
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster.spec),
        task_type=cluster.task_type,
        task_id=cluster.task_id,
        # This worker's --device/--devices: MWMS would otherwise take every GPU it sees (and a GPU under --device cpu).
        num_accelerators={"GPU": len(devices)} if devices[0].startswith("/GPU") else {},
        rpc_layer="grpc",
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    except RuntimeError as error:
        raise ConfigError(f"multi-worker training ({TF_CONFIG}): {error}") from None


def _check_same_job(strategy, job: dict) -> None:
    """Every worker trains the same job: compare a digest of it across the cluster (one small all-gather)."""
    import tensorflow as tf

    digest = int.from_bytes(hashlib.sha256(json.dumps(job, sort_keys=True).encode()).digest()[:6], "big")

    def mine():
        return tf.constant([digest], tf.int64)

    @tf.function
    def gather_digests():
        return strategy.gather(strategy.run(mine), axis=0)

    digests = gather_digests().numpy()
    if (digests != digest).any():
        raise TapelineError(
            f"the workers of run {job['run_id']} hold different jobs (config, data or warm start): "
            f"restart them so that they all read the chief's {Layout(PurePosixPath()).run(job['run_id']).cluster_job}"
        )
