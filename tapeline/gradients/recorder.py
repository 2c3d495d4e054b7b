"""What a training run keeps of each step's gradients, and why.

The loop tells a recorder what each step produced (its values by their `steps/`
columns, its batch's sample ids, the statistics computed on the device, and the
gradients still on the device); the recorder appends the step to the step log, asks the snapshot policy
whether to keep the step in full, and only then copies the gradients to the host
for the snapshot writer. It also applies the non-finite rule and answers which
values of the step were not finite, so the loop can stop.

`GradientRecorder` writes (the single process, or the chief of multi-worker
training); `NullRecorder`, on the other workers, applies the same rule and writes
nothing. The datasets written are described in tapeline/gradients/schema.py.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future

import numpy as np

from tapeline.gradients.schema import L2_NORM, Examples, global_norm, non_finite_variables
from tapeline.gradients.writers import SnapshotWriter, StepLog


def non_finite_values(loss: float, stats: np.ndarray, variables: list[str], loss_scaled: bool) -> list[str]:
    """What was not finite in a step ("loss", variable names); empty when the run may go on.

    Under loss scaling an overflowing gradient is expected now and then: the
    optimizer skips that step and lowers the scale. Only the loss decides there.
    """
    if not math.isfinite(loss):
        return ["loss", *non_finite_variables(stats, variables)]
    return [] if loss_scaled else non_finite_variables(stats, variables)


# The spike rule, the host's here and the device's in tapeline/training/calls.py (AnomalyWatch): a global norm above
# spike_factor times the running median of the last NORM_WINDOW finite steps, once MIN_NORMS of them were seen.
NORM_WINDOW = 100
MIN_NORMS = 10


class SnapshotPolicy:
    """Which steps are kept in full, and why: the first and last, every `every`-th,
    and anomalies: a non-finite value, or a norm spike (the rule above)."""

    def __init__(self, every: int, last_step: int, spike_factor: float, window: int = NORM_WINDOW):
        self.every, self.last_step, self.spike_factor = every, last_step, spike_factor
        self._norms: collections.deque = collections.deque(maxlen=window)

    def scheduled(self, step: int) -> bool:
        """Known before the step runs (so its weights can be read before the update)."""
        return step == 1 or step % self.every == 0 or step == self.last_step

    def reason(self, step: int, global_norm: float, finite: bool) -> str:
        """Comma-separated reasons to keep `step` in full; empty to keep only its statistics."""
        reasons = [
            name
            for name, applies in (
                ("first", step == 1),
                ("scheduled", step % self.every == 0),
                ("last", step == self.last_step),
                ("non-finite", not finite),
                ("norm-spike", finite and len(self._norms) >= MIN_NORMS and global_norm > self.spike_factor * np.median(self._norms)),
            )
            if applies
        ]
        if finite:
            self._norms.append(global_norm)
        return ",".join(reasons)


def _on_host(tensors: Sequence) -> list[np.ndarray]:
    return [np.asarray(t) for t in tensors]


class _Recording:
    """What both recorders do with a call of many steps (tapeline/training/calls.py): record each in turn."""

    def record_call(self, first_step: int, epoch: int, result, sample_ids: list[np.ndarray]) -> tuple[int, list[str]]:
        """Record the steps of one call (a calls.CallResult, whose `gradients` are those of its last step);
        (the last step, what was not finite in it).

        The call ended early at a non-finite step (the device applies the same rule),
        so that step is always its last; nothing after it is recorded.
        """
        last = result.steps - 1
        sizes = [len(ids) for ids in sample_ids]
        examples = [None] * len(sizes) if result.examples is None else result.examples.split(sizes)
        for i in range(result.steps):
            step = first_step + i
            values = {name: column[i] for name, column in result.values.items()}
            non_finite = self.record(step, epoch, values, sample_ids[i], result.stats[i], result.gradients if i == last else None, examples[i])
            if non_finite:
                return step, non_finite
        return first_step + last, []


class GradientRecorder(_Recording):
    """Owns the snapshot policy, the step log and the snapshot writer of one run; a context manager (closes the writer).

    `to_host` copies device tensors (gradients, weights) to numpy arrays in the stored
    dtype; it is called only for the steps kept in full. With `snapshot_weights`, a
    kept step's snapshot also holds the weights its gradient was taken at.
    """

    def __init__(
        self,
        variables: list[str],
        log: StepLog,
        snapshots: SnapshotWriter,
        policy: SnapshotPolicy,
        learning_rate: float,
        loss_scaled: bool = False,
        snapshot_weights: bool = False,
        to_host: Callable[[Sequence], list[np.ndarray]] = _on_host,
        on_snapshot: Callable[[int, list[str], list[np.ndarray]], None] | None = None,
    ):
        self.on_snapshot = on_snapshot  # (step, variables, host gradients): TensorBoard's histograms of a kept step
        self.variables, self.log, self.snapshots, self.policy = variables, log, snapshots, policy
        self.learning_rate, self.loss_scaled, self.snapshot_weights, self.to_host = learning_rate, loss_scaled, snapshot_weights, to_host
        self._weights: list[np.ndarray] | None = None

    def before_step(self, step: int, weights: Sequence) -> None:
        """Before `step` runs: read `weights` (the values its gradient is taken at) if the step is kept with them."""
        self._weights = self.to_host(weights) if self.snapshot_weights and self.policy.scheduled(step) else None

    def record(
        self, step: int, epoch: int, values: Mapping[str, float], sample_ids: np.ndarray, stats: np.ndarray, gradients: Sequence | None,
        examples: Examples | None = None,
    ) -> list[str]:  # fmt: skip
        """Log the step, keep it in full if the policy says so; returns what was not finite (see `non_finite_values`).

        `values`: the step's `steps/` columns by name (schema.STEP_COLUMNS), its loss at least; its global norm as
        the device computed it (calls.AnomalyWatch), else computed here from `stats`, [variables, STAT_NAMES] as
        `gradient_stats` computed them; `gradients`: on the device, None for a step inside a call (never kept: a
        call ends at every step that is); `examples`: the step's per-example results (per_example.py), numpy, None
        without per-example norms.
        """
        non_finite = non_finite_values(float(values["loss"]), stats, self.variables, self.loss_scaled)
        norm = float(values["global_norm"]) if "global_norm" in values else global_norm(stats)
        self.log.append(step, epoch, {**values, "global_norm": norm, "learning_rate": self.learning_rate}, sample_ids, stats, examples)
        reason = self.policy.reason(step, norm, finite=not non_finite)
        if reason and gradients is None:
            raise RuntimeError(f"step {step} is kept in full ({reason}) but its call did not end there")
        if reason:
            host = self.to_host(gradients)
            self.snapshots.write(step, epoch, reason, host, stats[:, L2_NORM], self._weights)
            if self.on_snapshot:
                self.on_snapshot(step, self.variables, host)
        self._weights = None
        if non_finite:
            self.log.flush()  # the run stops here: its log keeps every step up to this one (written by `close`)
        return non_finite

    def flush(self) -> Future | None:
        """Write the logged steps, in the background; the write (a checkpoint waits for it: a resume rewrites those
        rows, never misses them)."""
        return self.log.flush()

    def close(self) -> None:
        """Wait for the queued snapshots and the log's last flush to be written (the log is written by `flush` only)."""
        try:
            self.snapshots.close()
        finally:
            self.log.close()

    def __enter__(self) -> GradientRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullRecorder(_Recording):
    """The recorder of a worker that writes nothing (not the chief of multi-worker training).

    The same methods as `GradientRecorder`; it applies the same non-finite rule, so
    every worker stops at the same step, and keeps nothing.
    """

    def __init__(self, variables: list[str], loss_scaled: bool = False):
        self.variables, self.loss_scaled = variables, loss_scaled

    def before_step(self, step: int, weights: Sequence) -> None:
        pass

    def record(self, step: int, epoch: int, values: Mapping[str, float], sample_ids: np.ndarray, stats: np.ndarray, *results) -> list[str]:
        return non_finite_values(float(values["loss"]), stats, self.variables, self.loss_scaled)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> NullRecorder:
        return self

    def __exit__(self, *exc) -> None:
        pass
