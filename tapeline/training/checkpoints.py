"""Training checkpoints: what a killed training task needs to resume where it died.

One `tf.train.Checkpoint` holds the model, the optimizer (slots and iteration
count), the global step, and a JSON string with the rest of the loop's state: the
finished epochs' metrics, the running metrics of the current epoch, and the run's
parameters. The data order needs nothing more: it is a function of (seed, epoch),
so the step number alone says which batch comes next.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

from tapeline.errors import ConfigError
from tapeline.storage.root import Storage

KEEP = 3  # checkpoints kept; older ones are deleted by the manager


class TrainingCheckpoint:
    """Kept in the run's `checkpoints/`; on an object-store root each save is uploaded, the `checkpoint` index last.

    With `writes=False` (a non-chief worker of multi-worker training) `save` still
    runs, because reading the distributed variables takes every worker, but into a
    temporary directory that is deleted right after: only the chief keeps checkpoints.
    """

    def __init__(
        self,
        storage: Storage,
        directory: Path,
        model: keras.Model,
        optimizer,
        metrics: list[keras.metrics.Metric],
        parameters: dict,
        writes: bool = True,
    ):
        self.storage, self.directory, self.metrics, self.parameters, self.writes = storage, directory, metrics, parameters, writes
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        # A plain variable even under a distribution strategy: the loop's JSON state is host-side and the same on every
        # worker, and MultiWorkerMirroredStrategy cannot broadcast a string's initial value (its collectives take numbers).
        self._state = resource_variable_ops.ResourceVariable("{}", dtype=tf.string, trainable=False)
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=self.step, state=self._state)
        self._manager = tf.train.CheckpointManager(self._checkpoint, str(directory), max_to_keep=KEEP)
        self.latest_step: int | None = None  # the step of the latest checkpoint restored or saved; None before any

    def restore(self) -> tuple[int, list[dict]]:
        """Load the latest checkpoint, if any: (the step it was taken after, finished epochs' metrics)."""
        self._fetch_latest()
        latest = tf.train.latest_checkpoint(str(self.directory))
        if latest is None:
            return 0, []
        self._checkpoint.restore(latest).assert_existing_objects_matched()
        state = json.loads(self._state.numpy().decode())
        if state["parameters"] != self.parameters:
            changed = sorted(k for k in self.parameters if state["parameters"].get(k) != self.parameters[k])
            raise ConfigError(f"{latest} was trained with other values of {', '.join(changed)}: use a new run_name")
        for metric, values in zip(self.metrics, state["metrics"]):
            for variable, value in zip(metric.variables, values):
                variable.assign(value)
        self.latest_step = int(self.step.numpy())
        print(f"resuming from checkpoint {latest} at step {self.latest_step}")
        return self.latest_step, state["history"]

    def save(self, step: int, history: list[dict]) -> str:
        self.step.assign(step)
        self._state.assign(
            json.dumps(
                {
                    "parameters": self.parameters,
                    "history": history,
                    "metrics": [[v.numpy().tolist() for v in m.variables] for m in self.metrics],
                }
            )
        )
        if not self.writes:
            scratch = tempfile.mkdtemp(prefix="tapeline-worker-checkpoint-")
            try:
                saved = tf.train.CheckpointManager(self._checkpoint, scratch, max_to_keep=1).save(checkpoint_number=step)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            self.latest_step = step  # the chief's, saved in the same collective
            return saved
        kept = set(self._manager.checkpoints)
        with self.storage.publishing(self.directory, last="checkpoint"):  # the index after the files it names
            saved = self._manager.save(checkpoint_number=step)
        for dropped in kept - set(self._manager.checkpoints):  # the manager deletes local files only
            stale = [name for name in self.storage.listdir(self.directory) if name.startswith(Path(dropped).name + ".")]
            self.storage.delete(*(self.directory / name for name in stale))
        self.latest_step = step
        return saved

    def _fetch_latest(self) -> None:
        """Download the latest checkpoint of an object-store root: a resumed run may be on another machine."""
        if not self.storage.remote or not self.storage.exists(self.directory / "checkpoint"):
            return
        self.storage.fetch(self.directory / "checkpoint")
        latest = Path(tf.train.latest_checkpoint(str(self.directory))).name
        for name in self.storage.listdir(self.directory):
            if name.startswith(latest + "."):
                self.storage.fetch(self.directory / name)
        self._manager = tf.train.CheckpointManager(self._checkpoint, str(self.directory), max_to_keep=KEEP)
