"""Warm start: the model a run starts from instead of random weights, and why (run.json's `warm_start`).

- `--warm-start-from RUN`: the model of RUN, a completed run of the storage root, whatever
  data it was trained on: the user named it.
- `--warm-start`: the champion's (models/current), only if it was trained on the run's
  own training data (`DatasetFiles.train_set`) and its trainable variables are this
  model's; otherwise the run says why in one line and starts from random weights.

Either way the variables must match (run.json's `model.variables`: names and shapes, in
order): a named run whose do not is bad input, with the first difference named.

What to start from is chosen once, before any stage (`choose_warm_start`): a champion
promoted while the run downloads or trains does not change where it started. The run's
training data is known only after the download stage; `WarmStartChoice.record` decides
then whether the chosen champion fits it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tapeline.errors import ConfigError, TapelineError
from tapeline.registry.champion import current_champion
from tapeline.results import split_identity
from tapeline.storage.root import Storage

SAME_DATA = "champion, same data"
NAMED_RUN = "named run"


@dataclass(frozen=True)
class WarmStartChoice:
    """What a warm-started run may start from, read before any stage."""

    run_id: str | None  # the run whose model.keras is the start; None: there is none
    model: str | None  # its URI
    reason: str  # SAME_DATA (if the data match), NAMED_RUN, or why there is nothing to start from
    train_set: str | None = None  # the champion's training data (SAME_DATA); None when it is not known

    def record(self, train_set: str) -> dict:
        """run.json's `warm_start` for a run on the training data `train_set`: `from` (a run id, or None for random
        weights), `model`, `reason`."""
        if self.run_id is None:
            return _random(self.reason)
        if self.reason == SAME_DATA and self.train_set != train_set:
            data = "other training data" if self.train_set else "training data it does not record"
            return _random(f"the champion, run {self.run_id}, was trained on {data}")
        return {"from": self.run_id, "model": self.model, "reason": self.reason}


def choose_warm_start(storage: Storage, warm_start: bool, warm_start_from: str | None, variables: list[dict]) -> WarmStartChoice | None:
    """The start a run with these parameters, training a model of these `variables` (run.json's `model.variables`),
    may take (None: no warm start asked for). A named run that is not a completed run of the storage root, or whose
    model has other variables, is bad input (ConfigError)."""
    if warm_start_from is not None:
        return _named_run(storage, warm_start_from, variables)
    if not warm_start:
        return None
    champion = current_champion(storage)
    if champion is None:
        return WarmStartChoice(None, None, "no champion yet")
    if not storage.exists(storage.path_of(champion["model"])):
        raise TapelineError(f"warm start: the champion's model {champion['model']} is missing")
    if difference := _variables_difference(_recorded_variables(storage, champion["run_id"]), variables):
        return WarmStartChoice(None, None, f"the champion, run {champion['run_id']}, {difference}")
    return WarmStartChoice(champion["run_id"], champion["model"], SAME_DATA, champion_train_set(storage, champion))


def _named_run(storage: Storage, run_id: str, variables: list[dict]) -> WarmStartChoice:
    run = storage.layout.run(run_id)
    if not storage.exists(run.run_json):
        raise ConfigError(f"warm_start_from {run_id!r}: {storage.uri} has no completed run of that name (no runs/{run_id}/run.json)")
    if not storage.exists(run.model):
        raise ConfigError(f"warm_start_from {run_id!r}: the run has no model.keras")
    if difference := _variables_difference(_recorded_variables(storage, run_id), variables):
        raise ConfigError(f"warm_start_from {run_id!r}: the run {difference}")
    return WarmStartChoice(run_id, storage.uri_of(run.model), NAMED_RUN)


def _recorded_variables(storage: Storage, run_id: str) -> list[dict] | None:
    """The trainable variables run.json records for `run_id`'s model; None for a run.json that predates the record."""
    manifest = storage.layout.run(run_id).run_json
    return storage.read_json(manifest).get("model", {}).get("variables") if storage.exists(manifest) else None


def _variables_difference(theirs: list[dict] | None, ours: list[dict]) -> str | None:
    """How another model's trainable variables differ from this one's, in words ("has …, this model …"); None when
    they are the same names and shapes in the same order, or not recorded (a run of the example's CNN)."""
    if theirs is None or theirs == ours:
        return None
    if len(theirs) != len(ours):
        return f"trained a model of {len(theirs)} trainable variables; this model has {len(ours)}"
    index, (their, our) = next((i, pair) for i, pair in enumerate(zip(theirs, ours)) if pair[0] != pair[1])
    return f"trained a model whose variable {index + 1} is {_variable(their)}; this model's is {_variable(our)}"


def _variable(variable: dict) -> str:
    return f"{variable['name']} {'x'.join(map(str, variable['shape'])) or 'scalar'}"


def champion_train_set(storage: Storage, champion: dict) -> str | None:
    """The champion's training data: recorded in the pointer, or, in a pointer written before it was, in its run.json."""
    if champion.get("train_set"):
        return champion["train_set"]
    manifest = storage.layout.run(champion["run_id"]).run_json
    return split_identity(storage.read_json(manifest)["dataset"]["sha256"], "train") if storage.exists(manifest) else None


def _random(reason: str) -> dict:
    return {"from": None, "model": None, "reason": reason}
