"""Training checkpoints: what a killed training task needs to resume where it died.

One `tf.train.Checkpoint` holds the model, the optimizer (slots and iteration
count), the global step, and a JSON string with the rest of the loop's state: the
finished epochs' metrics, the running metrics of the current epoch, and the run's
parameters. The data order needs nothing more: it is a function of (seed, epoch),
so the step number alone says which batch comes next.

Given a `shadow` (a second model and optimizer of the same structure), a save
costs the training thread only a copy of the variables into it; a background
thread writes the shadow's checkpoint (TensorFlow writes the data files first,
the `checkpoint` index last, so a crash leaves the previous checkpoint as the
latest complete one) and publishes it. At most one save is in flight: the next
waits for it. (TensorFlow's own async checkpointing fails on Keras 3 variables
from the second save on: Keras creates a new variable per copy.)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import keras
import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

from tapeline.errors import ConfigError
from tapeline.storage.root import Storage

KEEP = 3  # checkpoints kept; older ones are deleted by the manager


STATE_KEY = "state/.ATTRIBUTES/VARIABLE_VALUE"  # the `state` variable of the checkpoint below, as tf.train names it


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
        shadow: tuple[keras.Model, object] | None = None,
    ):
        self.storage, self.directory, self.metrics, self.parameters, self.writes = storage, directory, metrics, parameters, writes
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        # A plain variable even under a distribution strategy: the loop's JSON state is host-side and the same on every
        # worker, and MultiWorkerMirroredStrategy cannot broadcast a string's initial value (its collectives take numbers).
        self._state = resource_variable_ops.ResourceVariable("{}", dtype=tf.string, trainable=False)
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=self.step, state=self._state)
        self.latest_step: int | None = None  # the step of the latest checkpoint restored or saved; None before any
        self._saved, self._copy, self._publisher, self._in_flight = self._checkpoint, None, None, None
        if shadow and writes:
            self._saved, self._copy = self._shadow_of(model, optimizer, *shadow)
            self._publisher = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._manager = tf.train.CheckpointManager(self._saved, str(directory), max_to_keep=KEEP)

    def _shadow_of(self, model, optimizer, shadow_model, shadow_optimizer) -> tuple[tf.train.Checkpoint, object]:
        """The shadow's checkpoint (the same object graph as this one's) and the function that copies into it."""
        step = tf.Variable(0, dtype=tf.int64, trainable=False)
        state = resource_variable_ops.ResourceVariable("{}", dtype=tf.string, trainable=False)
        live = [*model.weights, *optimizer.variables, self.step, self._state]
        copies = [*shadow_model.weights, *shadow_optimizer.variables, step, state]
        if [tuple(v.shape) for v in live] != [tuple(v.shape) for v in copies]:
            raise ValueError("the checkpoint's shadow does not have the model's and optimizer's structure")

        @tf.function
        def copy():
            for source, target in zip(live, copies):
                target.assign(source)

        return tf.train.Checkpoint(model=shadow_model, optimizer=shadow_optimizer, step=step, state=state), copy

    def restore(self) -> tuple[int, list[dict]]:
        """Load the latest checkpoint, if any: (the step it was taken after, finished epochs' metrics)."""
        self._fetch_latest()
        if self.writes:
            self._remove_partial_saves()  # a killed process's
        latest = tf.train.latest_checkpoint(str(self.directory))
        if latest is None:
            return 0, []
        state = json.loads(tf.train.load_checkpoint(latest).get_tensor(STATE_KEY).decode())  # read before restoring:
        if state["parameters"] != self.parameters:  # another model's variables would not even fit
            changed = sorted(k for k in self.parameters if state["parameters"].get(k) != self.parameters[k])
            raise ConfigError(f"{latest} was trained with other values of {', '.join(changed)}: use a new run_name")
        self._checkpoint.restore(latest).assert_existing_objects_matched()
        for metric, values in zip(self.metrics, state["metrics"]):
            for variable, value in zip(metric.variables, values):
                variable.assign(value)
        self.latest_step = int(self.step.numpy())
        print(f"resuming from checkpoint {latest} at step {self.latest_step}")
        return self.latest_step, state["history"]

    def save(self, step: int, history: list[dict], after: Future | None = None) -> str:
        """Checkpoint the state after `step`; published only once `after` (the step log's flush of the rows
        before it) is done, so a resumed run never misses a logged step."""
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
        self.wait()  # at most one save in flight
        if self._publisher is None:
            return self._write(step, after)
        self._copy()  # the values of this step; training goes on while they are written
        self._in_flight = self._publisher.submit(self._write, step, after)
        return str(self.directory / f"ckpt-{step}")

    def wait(self) -> None:
        """Until the save in flight, if any, is written and published (raises what it raised)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def __enter__(self) -> TrainingCheckpoint:
        return self

    def __exit__(self, error_type, *exc) -> None:
        """The save in flight finished, also when training stops on an error (a retry in this process may resume from it)."""
        if error_type is None:
            self.wait()
        else:
            with contextlib.suppress(Exception):  # the error that stopped training is the one to report
                self.wait()

    def _write(self, step: int, after: Future | None = None) -> str:
        """Write a checkpoint, upload it and the index (to an object store), delete the ones the manager dropped."""
        if after is not None:
            after.result()  # raises what the log's write raised: no checkpoint past rows that were lost
        kept = set(self._manager.checkpoints)
        with self.storage.publishing(self.directory, last="checkpoint"):  # the index after the files it names
            try:
                saved = self._manager.save(checkpoint_number=step)
            except BaseException:  # a full disk, say: its temporary files go
                self._remove_partial_saves()
                raise
        for dropped in kept - set(self._manager.checkpoints):  # the manager deletes local files only
            stale = [name for name in self.storage.listdir(self.directory) if name.startswith(Path(dropped).name + ".")]
            self.storage.remove(*(self.directory / name for name in stale))
        self.latest_step = step
        return saved

    def _remove_partial_saves(self) -> None:
        """What a failed or killed save leaves, none of which a restore uses: TensorFlow's `<prefix>_temp/` (a
        checkpoint's files before they are merged into place) and `checkpoint.tmp<hex>` (the index before its rename).
        (A save that failed after its merge left files under its final names, which the rerun's save of that step replaces.)"""
        for partial in self.directory.glob("*_temp"):
            shutil.rmtree(partial, ignore_errors=True)
        for partial in self.directory.glob("checkpoint.tmp*"):
            partial.unlink(missing_ok=True)

    def _fetch_latest(self) -> None:
        """Download the latest checkpoint of an object-store root: a resumed run may be on another machine."""
        if not self.storage.remote or not self.storage.exists(self.directory / "checkpoint"):
            return
        self.storage.fetch(self.directory / "checkpoint")
        # The index's own entry: `latest_checkpoint` answers None until the files it names are here, which they are not yet.
        latest = Path(tf.train.get_checkpoint_state(str(self.directory)).model_checkpoint_path).name
        for name in self.storage.listdir(self.directory):
            if name.startswith(latest + "."):
                self.storage.fetch(self.directory / name)
        self._manager = tf.train.CheckpointManager(self._saved, str(self.directory), max_to_keep=KEEP)
