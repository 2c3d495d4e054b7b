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

import enum
import functools
import os
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from tapeline.data.decode import CHANNELS, IMAGE_SIZE_PATTERN
from tapeline.data.interface import DataRequest
from tapeline.data.sources import OWN_DATA, SOURCES, source_of
from tapeline.data.splits import TrainingSplit, training_split
from tapeline.errors import ConfigError
from tapeline.gradients.schema import GRADIENT_DTYPES
from tapeline.storage.access import usable_root

DEFAULT_STORAGE = "./artifacts"
DEFAULT_MODEL = "tapeline.model:cnn"  # the example's CNN (tapeline/model.py)
STORAGE_ENV = "TAPELINE_STORAGE"
DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


@dataclass(frozen=True)
class Rule:
    """A string parameter's constraint in words, for its error message (pydantic and the schema ignore it)."""

    text: str


class Role(enum.Enum):
    """What a parameter is besides a flow parameter, marked in its annotation."""

    RESUME = "a checkpoint trained under another value is not resumed"
    HPARAM = "changes what is learned: runs are compared by it (TensorBoard's HParams)"
    PLACE = "says where files go or how data is fetched, not what the run is: a completed run is the same run whatever it says"


RESUME, HPARAM, PLACE = Role.RESUME, Role.HPARAM, Role.PLACE

Dataset = Annotated[
    Literal[tuple(SOURCES)],
    Field(
        description="dataset to train on: one of the registry, or your own in the --source directory: idx (four IDX files), "
        "images (a folder per class), parquet (Hugging Face Hub Parquet files); docs/your-data.md"
    ),
    RESUME,
    HPARAM,
]
Source = Annotated[
    str | None,
    Field(
        description="URL or local directory to take the dataset files from instead of the built-in mirrors "
        f"(dataset {', '.join(OWN_DATA)}: required, a directory)"
    ),
]
ImageSize = Annotated[
    str | None,
    Field(
        pattern=IMAGE_SIZE_PATTERN,
        description="resize every decoded image to HEIGHTxWIDTH pixels, e.g. 32x32 (dataset images, parquet); default: keep their one size",
    ),
    Rule("must be HEIGHTxWIDTH in pixels, like 32x32"),
    RESUME,
    HPARAM,
]
Channels = Annotated[
    Literal[CHANNELS] | None,
    Field(description="convert every decoded image to 1 (grey) or 3 (RGB) channels (dataset images, parquet); default: as the files have them"),
    RESUME,
    HPARAM,
]
Model = Annotated[
    str,
    Field(
        min_length=1,
        description="the model: package.module:function or path/to/file.py:function, called as function(input_shape, num_classes), "
        "or a .keras file (path or URI); default: the example's CNN",
    ),
    RESUME,
    HPARAM,
]
StorageRoot = Annotated[str | None, Field(description=f"root for everything the pipeline writes (default ${STORAGE_ENV} or {DEFAULT_STORAGE})"), PLACE]
# A run name becomes a directory under <storage>/runs: one plain path segment (and no '..' in it).
RUN_NAME_LENGTH = 128
RUN_NAME_PATTERN = r"^[A-Za-z0-9](\.?[A-Za-z0-9_-])*\.?$"
RUN_NAME_RULE = Rule(f"must be one path segment of letters, digits, '.', '_' or '-' (no '..'), at most {RUN_NAME_LENGTH} characters")
RunName = Annotated[
    str | None,
    Field(pattern=RUN_NAME_PATTERN, max_length=RUN_NAME_LENGTH, description="run id; default: a timestamp and a random suffix"),
    RUN_NAME_RULE,
    PLACE,
]
PrepareOn = Annotated[
    str | None,
    Field(
        pattern=r"^prepare-data/[^/]+$",
        description="download and preprocess first as this deployment of prepare-data (e.g. prepare-data/cpu), on its worker",
    ),
    Rule("must name a deployment of prepare-data, like prepare-data/cpu"),
    PLACE,
]
PrepareTimeout = Annotated[
    float,
    Field(
        gt=0,
        allow_inf_nan=False,
        description="seconds to wait for a worker to pick up the --prepare-on run; then it is cancelled and the run fails",
    ),
    PLACE,
]
Refresh = Annotated[bool, Field(description="download and preprocess again even when the storage root already has the result"), PLACE]
Epochs = Annotated[int, Field(ge=1, description="passes over the training split"), HPARAM]
BatchSize = Annotated[int, Field(ge=1, description="samples per training step (at most the training samples used)"), RESUME, HPARAM]
LearningRate = Annotated[float, Field(gt=0, allow_inf_nan=False, description="Adam learning rate"), RESUME, HPARAM]
Seed = Annotated[int, Field(ge=0, description="seed for the validation split, data order and initial weights"), RESUME, HPARAM]
TrainLimit = Annotated[
    int | None,
    Field(ge=1, description="use only the first N training samples (smoke runs); all of them when the split has fewer"),
    RESUME,
    HPARAM,
]
ValidationSize = Annotated[int, Field(ge=0, description="training samples held out for validation"), RESUME, HPARAM]
SnapshotEvery = Annotated[int, Field(ge=1, description="full gradient snapshot every N steps")]
SnapshotWeights = Annotated[bool, Field(description="store each scheduled snapshot's weights (before the update) beside its gradients")]
GradientDtype = Annotated[Literal[tuple(GRADIENT_DTYPES)], Field(description="dtype of stored gradient values (statistics are float32)")]
SpikeFactor = Annotated[
    float,
    Field(gt=1, allow_inf_nan=False, description="also snapshot in full when the global gradient norm exceeds this many times its running median"),
]
CheckpointEvery = Annotated[int, Field(ge=1, description="checkpoint every N steps (and at each epoch end)")]
KeepCheckpoints = Annotated[
    bool, Field(description="keep the run's checkpoints once it completes (by default they are deleted after run.json is written)"), PLACE
]
PromotionMargin = Annotated[float, Field(ge=0, lt=1, description="promote the new model only if its test accuracy beats the champion's by this much")]
WarmStart = Annotated[
    bool,
    Field(description="start from the current champion's weights if it was trained on the same training data, else from random ones"),
    HPARAM,
]
WarmStartFrom = Annotated[
    str | None,
    Field(
        pattern=RUN_NAME_PATTERN,
        max_length=RUN_NAME_LENGTH,
        description="start from the model of this completed run of the storage root, whatever data it was trained on (implies --warm-start)",
    ),
    RUN_NAME_RULE,
]
# `none`, `auto`, a run id (one path segment) or a run's run.json (a path or URI ending in /run.json).
EXCLUDE_PATTERN = r"^(?:[A-Za-z0-9](\.?[A-Za-z0-9_-])*\.?|.+/run\.json)$"
Exclude = Annotated[
    str,
    Field(
        pattern=EXCLUDE_PATTERN,
        description="leave training examples out of the training split: none; a run id or run.json whose flagged label issues "
        "are left out; auto, the champion's, when it was trained on the same training data",
    ),
    Rule("must be none, auto, a run id, or a path or URI ending in /run.json"),
    RESUME,
]
Precision = Annotated[Literal[PRECISIONS], Field(description="compute precision; variables and exported gradients stay float32"), RESUME, HPARAM]
JitCompile = Annotated[bool, Field(description="compile the train step with XLA, as one fused program")]
StepsPerCall = Annotated[
    int,
    Field(
        ge=1,
        le=1000,
        description="training steps per call from Python (fewer at snapshots, checkpoints, epoch ends, anomalies)",
    ),
]
PerExampleNorms = Annotated[bool, Field(description="compute every example's gradient norms and the gradient noise scale in each step (the samples dataset)")]
Deterministic = Annotated[bool, Field(description="deterministic ops: same seed, same machine -> identical weights and gradients"), RESUME]
Device = Annotated[Literal[DEVICES], Field(description="where to train: auto uses a GPU when TensorFlow sees one")]
Devices = Annotated[int, Field(ge=1, description="train on N devices with MirroredStrategy (GPUs, else CPU cores)")]
AcceptUnlockedStorage = Annotated[
    bool,
    Field(
        description="train on a remote root other than s3:// although its store gives no conditional write "
        "(the run lease and the champion pointer then do not keep writers apart)"
    ),
    PLACE,
]


@dataclass(frozen=True)
class RunConfig:
    dataset: Dataset = "mnist"
    source: Source = None
    image_size: ImageSize = None
    channels: Channels = None
    model: Model = DEFAULT_MODEL
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
    keep_checkpoints: KeepCheckpoints = False
    promotion_margin: PromotionMargin = 0.0
    warm_start: WarmStart = False
    warm_start_from: WarmStartFrom = None
    exclude: Exclude = "none"
    precision: Precision = "float32"
    jit_compile: JitCompile = True
    steps_per_call: StepsPerCall = 50
    per_example_norms: PerExampleNorms = True
    deterministic: Deterministic = False
    device: Device = "auto"
    devices: Devices = 1
    accept_unlocked_storage: AcceptUnlockedStorage = False

    def validated(self) -> RunConfig:
        """Check every parameter against its rule and the batch size against the training split, then resolve the
        storage root and check it can be used.

        Leaves nothing behind: a bad parameter must leave the storage root as it was.
        """
        for parameter in run_parameters():
            parameter.check(getattr(self, parameter.name))
        # Your own files: a cheap look now (headers, the tree and one image, a schema), so a bad source starts nothing;
        # a directory is recorded as an absolute path.
        source = source_of(self.dataset).check(self.data)
        warm_start = self.warm_start or self.warm_start_from is not None  # a named run to start from is a warm start
        checked = replace(self, source=source, warm_start=warm_start)
        checked.training_split().check_batch_size(self.batch_size)  # the split's size: the registry's, or the headers'
        return replace(checked, storage=usable_root(storage_root(self.storage)))

    def training_split(self) -> TrainingSplit:
        """The samples training will use, known before any stage: the training data's count is the registry's for a
        built-in dataset (its files must match the registry's digests), and for your own the IDX header's, the image
        folder's files (less the test split held out) or the Parquet files' row counts. ConfigError when
        validation_size leaves none."""
        return training_split(source_of(self.dataset).train_count(self.data), self.validation_size, self.train_limit)

    @property
    def data(self) -> DataRequest:
        """The parameters that say which data and how to make arrays of it: what the data sources are asked."""
        return DataRequest.of(self)

    def parameters(self) -> dict:
        """Every parameter by name, as recorded in run.json."""
        return asdict(self)


def storage_root(storage: str | None) -> str:
    """The storage root a run writes to, or a command reads from: `storage`, else $TAPELINE_STORAGE, else ./artifacts."""
    return storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def run_identity(parameters: dict) -> dict:
    """The parameters that make a run what it is, from `RunConfig.parameters()` or a run.json's `parameters`
    (validated ones: storage and source resolved): all but those marked PLACE, and a registry dataset's `source`
    (whichever it is, the files are the registry's, verified). A parameter the record predates counts as its default."""
    defaults = {parameter.name: parameter.default for parameter in run_parameters()}
    values = defaults | {name: value for name, value in parameters.items() if name in defaults}
    ignored = {p.name for p in parameters_with(PLACE)} | (set() if values["dataset"] in OWN_DATA else {"source"})
    return {name: value for name, value in values.items() if name not in ignored}


# The retention policy of `tapeline gc` and gc-flow; tapeline/registry/retention.py applies it.
KeepLast = Annotated[int, Field(ge=0, description="keep the N most recently finished runs")]
OlderThan = Annotated[
    float | None,
    Field(
        ge=0,
        allow_inf_nan=False,
        description="delete only runs that finished more than DAYS days ago, and runs that never completed DAYS days after their last write",
    ),
]
# gc-flow's `delete` is `tapeline gc --yes` (a key `yes` is a boolean to YAML 1.1, and so in prefect.yaml).
Delete = Annotated[bool, Field(description="delete; without it, only list what would be deleted and its bytes")]


@dataclass(frozen=True)
class RetentionPolicy:
    """Which runs `tapeline gc` keeps besides the champion, its lineage and runs being written."""

    keep_last: KeepLast = 7
    older_than: OlderThan = None

    def validated(self) -> RetentionPolicy:
        for parameter in retention_parameters():
            parameter.check(getattr(self, parameter.name))
        return self


@dataclass(frozen=True)
class Parameter:
    """One run parameter as the CLI, the checks and docs/parameters.md see it, read from its annotation."""

    name: str
    kind: type  # what a flag's text is parsed as: str, int, float or bool (a Literal's: its values' type)
    default: object
    help: str
    choices: tuple[str, ...] | None
    rule: str  # the constraint in words: "at least 1", "above 0", a Rule's text; "" when any value of its type goes
    roles: frozenset[Role]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value) -> None:
        """Raise ConfigError, one line, when the value breaks the parameter's type or constraint."""
        try:
            _adapter(self.name).validate_python(value, strict=True)  # strict: "3" is not an epoch count
        except ValidationError as error:
            raise ConfigError(self.complaint(value, error.errors()[0])) from None

    def complaint(self, value, error: dict) -> str:
        """The one line for `value`, from pydantic's first error about it."""
        error_type = error["type"]
        if error_type == "string_too_long":
            return f"{self.name} is {len(value)} characters; at most {error['ctx']['max_length']} are allowed"
        if self.choices:
            return f"unknown {self.name} {value!r}; choose one of: {', '.join(map(str, self.choices))}"
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
    return _parameters(RunConfig)


@functools.cache
def retention_parameters() -> tuple[Parameter, ...]:
    """The retention policy's parameters, the flags of `tapeline gc`."""
    return _parameters(RetentionPolicy)


def _parameters(declared: type) -> tuple[Parameter, ...]:
    annotations = _annotations()
    return tuple(_parameter(f.name, annotations[f.name], f.default) for f in fields(declared))


def parameters_with(role: Role) -> tuple[Parameter, ...]:
    """The run parameters marked with `role`, in declaration order."""
    return tuple(p for p in run_parameters() if role in p.roles)


def _annotations() -> dict:
    """Each field's full annotation, constraints included (the two dataclasses share no field name)."""
    return typing.get_type_hints(RunConfig, include_extras=True) | typing.get_type_hints(RetentionPolicy, include_extras=True)


def _parameter(name: str, annotation, default) -> Parameter:
    info = FieldInfo.from_annotation(annotation)
    kind = _without_none(info.annotation)
    choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else None
    rule = next((m.text for m in info.metadata if isinstance(m, Rule)), None)
    roles = frozenset(m for m in info.metadata if isinstance(m, Role))
    kind = type(choices[0]) if choices else kind
    return Parameter(name, kind, default, info.description, choices, rule or _bounds_in_words(info.metadata), roles)


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
