"""Run parameters: each declared once, its rule beside it, and checked once, before any stage runs.

Each parameter is a type alias below (its type, its constraint and its help, as pydantic
reads them) and a field of RunConfig (its default). The flows annotate their parameters
with the same aliases, so a deployment's parameter schema carries the constraints and
Prefect refuses `prefect deployment run … --param epochs=0` when the run is created, as it
refuses `epochs=many`. The field names are the flow's parameter names and, dashed, the
CLI's flags, so `python flows/train.py --train-limit 100` and
`prefect deployment run 'train-flow/on-demand' --param train_limit=100` mean the same.
docs/parameters.md is generated from here: `python -m tapeline.config > docs/parameters.md`.
"""

from __future__ import annotations

import functools
import os
import tempfile
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Literal

import pyarrow.fs as pafs
from pydantic import Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from tapeline.data.idx_source import IDX, check_idx_source
from tapeline.data.registry import DATASETS
from tapeline.errors import ConfigError
from tapeline.storage.root import is_remote, remote_filesystem
from tapeline.storage.versioned import s3_client

DEFAULT_STORAGE = "./artifacts"
STORAGE_ENV = "TAPELINE_STORAGE"
DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
GRADIENT_DTYPES = ("float32", "float16")  # the gradient schema (tapeline/gradients/writers.py) maps each to its Arrow type


@dataclass(frozen=True)
class Rule:
    """A string parameter's constraint in words, for its error message (pydantic and the schema ignore it)."""

    text: str


Dataset = Annotated[
    Literal[(*DATASETS, IDX)],
    Field(description=f"dataset to train on: one of the registry, or {IDX} for your own four IDX files, in the --source directory"),
]
Source = Annotated[
    str | None,
    Field(description=f"URL or local directory to take the dataset files from instead of the built-in mirrors (dataset {IDX}: required, a directory)"),
]
StorageRoot = Annotated[str | None, Field(description=f"root for everything the pipeline writes (default ${STORAGE_ENV} or {DEFAULT_STORAGE})")]
# A run name becomes a directory under <storage>/runs: one plain path segment (and no '..' in it).
RunName = Annotated[
    str | None,
    Field(pattern=r"^[A-Za-z0-9](\.?[A-Za-z0-9_-])*\.?$", max_length=128, description="run id; default: a timestamp and a random suffix"),
    Rule("must be one path segment of letters, digits, '.', '_' or '-' (no '..')"),
]
PrepareOn = Annotated[
    str | None,
    Field(
        pattern=r"^prepare-data/[^/]+$",
        description="download and preprocess first as this deployment of prepare-data (e.g. prepare-data/cpu), on its worker",
    ),
    Rule("must name a deployment of prepare-data, like prepare-data/cpu"),
]
PrepareTimeout = Annotated[
    float,
    Field(
        gt=0,
        allow_inf_nan=False,
        description="seconds to wait for a worker to pick up the --prepare-on run; then it is cancelled and the run fails",
    ),
]
Refresh = Annotated[bool, Field(description="download and preprocess again even when the storage root already has the result")]
Epochs = Annotated[int, Field(ge=1, description="passes over the training split")]
BatchSize = Annotated[int, Field(ge=1, description="samples per training step")]
LearningRate = Annotated[float, Field(gt=0, allow_inf_nan=False, description="Adam learning rate")]
Seed = Annotated[int, Field(ge=0, description="seed for the validation split, data order and initial weights")]
TrainLimit = Annotated[int | None, Field(ge=1, description="use only the first N training samples (smoke runs)")]
ValidationSize = Annotated[int, Field(ge=0, description="training samples held out for validation")]
SnapshotEvery = Annotated[int, Field(ge=1, description="full gradient snapshot every N steps")]
SnapshotWeights = Annotated[bool, Field(description="store each scheduled snapshot's weights (before the update) beside its gradients")]
GradientDtype = Annotated[Literal[GRADIENT_DTYPES], Field(description="dtype of stored gradient values (statistics are float32)")]
SpikeFactor = Annotated[
    float,
    Field(gt=1, allow_inf_nan=False, description="also snapshot in full when the global gradient norm exceeds this many times its running median"),
]
CheckpointEvery = Annotated[int, Field(ge=1, description="checkpoint every N steps (and at each epoch end)")]
PromotionMargin = Annotated[
    float, Field(ge=0, lt=1, description="promote the new model only if its test accuracy beats the champion's by this much")
]
WarmStart = Annotated[bool, Field(description="start from the current champion's weights (a champion of the same dataset), not random ones")]
Precision = Annotated[Literal[PRECISIONS], Field(description="compute precision; variables and exported gradients stay float32")]
JitCompile = Annotated[bool, Field(description="compile the train step with XLA, as one fused program")]
StepsPerCall = Annotated[
    int,
    Field(
        ge=1,
        le=1000,
        description="training steps per call from Python (fewer at snapshots, checkpoints, epoch ends, anomalies)",
    ),
]
PerExampleNorms = Annotated[
    bool, Field(description="compute every example's gradient norms and the gradient noise scale in each step (the samples dataset)")
]
Deterministic = Annotated[bool, Field(description="deterministic ops: same seed, same machine -> identical weights and gradients")]
Device = Annotated[Literal[DEVICES], Field(description="where to train: auto uses a GPU when TensorFlow sees one")]
Devices = Annotated[int, Field(ge=1, description="train on N devices with MirroredStrategy (GPUs, else CPU cores)")]


@dataclass(frozen=True)
class RunConfig:
    dataset: Dataset = "mnist"
    source: Source = None
    storage: StorageRoot = None
    run_name: RunName = None
    prepare_on: PrepareOn = None
    prepare_timeout: PrepareTimeout = 600.0
    refresh: Refresh = False
    epochs: Epochs = 5
    batch_size: BatchSize = 32
    learning_rate: LearningRate = 1e-3
    seed: Seed = 42
    train_limit: TrainLimit = None
    validation_size: ValidationSize = 5000
    snapshot_every: SnapshotEvery = 250
    snapshot_weights: SnapshotWeights = False
    gradient_dtype: GradientDtype = "float32"
    spike_factor: SpikeFactor = 10.0
    checkpoint_every: CheckpointEvery = 500
    promotion_margin: PromotionMargin = 0.0
    warm_start: WarmStart = False
    precision: Precision = "float32"
    jit_compile: JitCompile = True
    steps_per_call: StepsPerCall = 50
    per_example_norms: PerExampleNorms = True
    deterministic: Deterministic = False
    device: Device = "auto"
    devices: Devices = 1

    def validated(self) -> RunConfig:
        """Check every parameter against its rule, then resolve the storage root and check it can be used.

        Leaves nothing behind: a bad parameter must leave the storage root as it was.
        """
        for parameter in run_parameters():
            parameter.check(getattr(self, parameter.name))
        # Your own files: their headers now, so a bad directory starts nothing; recorded as an absolute path.
        source = check_idx_source(self.source) if self.dataset == IDX else self.source
        storage = self.storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
        return replace(self, source=source, storage=_usable_root(storage))

    def parameters(self) -> dict:
        """Every parameter by name, as recorded in run.json."""
        return asdict(self)


@dataclass(frozen=True)
class Parameter:
    """One run parameter as the CLI, the checks and docs/parameters.md see it, read from its annotation."""

    name: str
    kind: type  # what a flag's text is parsed as: str, int, float or bool
    default: object
    help: str
    choices: tuple[str, ...] | None
    rule: str  # the constraint in words: "at least 1", "above 0", a Rule's text; "" when any value of its type goes

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value) -> None:
        """Raise ConfigError, one line, when the value breaks the parameter's type or constraint."""
        try:
            _adapter(self.name).validate_python(value, strict=True)  # strict: "3" is not an epoch count
        except ValidationError as error:
            raise ConfigError(self.complaint(value, error.errors()[0]["type"])) from None

    def complaint(self, value, error_type: str) -> str:
        if self.choices:
            return f"unknown {self.name} {value!r}; choose one of: {', '.join(self.choices)}"
        if self.kind is bool:
            return f"{self.name} must be true or false, got {value!r}"
        if self.kind is str:
            return f"{self.name} {value!r} {self.rule or 'must be text'}"
        if self.kind is int and error_type.startswith("int"):
            return f"{self.name} must be a whole number, got {value!r}"
        return f"{self.name} must be {'a number ' if self.kind is float else ''}{self.rule}, got {value!r}"


@functools.cache
def run_parameters() -> tuple[Parameter, ...]:
    """The run parameters, in declaration order (the CLI builds its flags from these)."""
    annotations = _annotations()
    return tuple(_parameter(f.name, annotations[f.name], f.default) for f in fields(RunConfig))


def _annotations() -> dict:
    """Each field's full annotation, constraints included."""
    return typing.get_type_hints(RunConfig, include_extras=True)


def _parameter(name: str, annotation, default) -> Parameter:
    info = FieldInfo.from_annotation(annotation)
    kind = _without_none(info.annotation)
    choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else None
    rule = next((m.text for m in info.metadata if isinstance(m, Rule)), None)
    return Parameter(name, str if choices else kind, default, info.description, choices, rule or _bounds_in_words(info.metadata))


def _without_none(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(t for t in typing.get_args(annotation) if t is not type(None))
    return annotation


def _bounds_in_words(metadata: list) -> str:
    """A number's bounds: "at least 1", "above 0", "from 0 to below 1"."""
    bounds = {key: getattr(m, key) for m in metadata for key in ("ge", "gt", "lt") if hasattr(m, key)}
    if bounds.keys() == {"ge", "lt"}:
        return f"from {bounds['ge']:g} to below {bounds['lt']:g}"
    words = {"ge": "at least", "gt": "above", "lt": "below"}
    return " and ".join(f"{words[key]} {value:g}" for key, value in bounds.items())


@functools.cache
def _adapter(name: str) -> TypeAdapter:
    return TypeAdapter(_annotations()[name])  # built on first use: `--help` never needs one


def _usable_root(storage: str) -> str:
    return _reachable_root(storage) if is_remote(storage) else str(_writable_root(storage))


def _reachable_root(storage: str) -> str:
    """Ask the object store now whether the bucket exists and takes these credentials; write nothing.

    Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, …), and
    the endpoint from AWS_ENDPOINT_URL: neither is in any message.
    """
    try:
        if storage.startswith("s3://"):
            s3_client()  # boto3, for the champion pointer and the run lease: before any stage needs it
        filesystem, path = remote_filesystem(storage)
        bucket = path.split("/")[0]
        if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ConfigError(f"bucket {bucket!r} does not exist")
        filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))  # listing needs read access
    except (OSError, ValueError, ImportError) as error:  # a ConfigError is a ValueError
        raise ConfigError(f"storage {storage!r}: {' '.join(str(error).split())}") from None
    return storage.rstrip("/")


def _writable_root(storage: str) -> Path:
    path = Path(storage.removeprefix("file://")).expanduser().resolve()
    # The root may not exist yet: it will be created under its nearest existing ancestor.
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"storage {storage!r}: {existing} is not a directory")
    _probe_write(storage, existing)
    return path


def _probe_write(storage: str, directory: Path) -> None:
    """Create and remove a file: os.access says yes to root everywhere, even in /proc or on a read-only mount."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".tapeline-probe-"):
            pass
    except OSError as error:
        raise ConfigError(f"storage {storage!r}: cannot create files in {directory} ({error.strerror or error})") from None


def parameters_markdown() -> str:
    """docs/parameters.md: every run parameter in one table, generated from the declarations above."""
    lines = [
        "# Run parameters",
        "",
        "Generated from `tapeline/config.py` by `python -m tapeline.config > docs/parameters.md` (a test checks it matches).",
        "The same names are the flow's parameters (`prefect deployment run 'train-flow/on-demand' --param epochs=3`)",
        "and, dashed, the flags of `tapeline train` and `python flows/train.py`. A deployment run whose parameters break",
        "a constraint is refused when it is created; the command line refuses them before it starts.",
        "",
        "| parameter | flag | type | default | constraint | help |",
        "|---|---|---|---|---|---|",
    ]
    for p in run_parameters():
        kind = "bool" if p.kind is bool else p.kind.__name__
        flag = f"`{p.flag}` / `--no-{p.flag[2:]}`" if p.kind is bool else f"`{p.flag}`"
        constraint = "one of " + ", ".join(f"`{c}`" for c in p.choices) if p.choices else p.rule
        default = "" if p.default is None else f"`{p.default}`"
        lines.append(f"| `{p.name}` | {flag} | {kind} | {default} | {constraint} | {p.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(parameters_markdown(), end="")
