"""Run parameters: one object, validated once, before any stage runs.

The field names are the flow's parameter names and, dashed, the CLI's flags, so
`python flows/train.py --train-limit 100` and
`prefect deployment run 'train-flow/on-demand' --param train_limit=100` mean the same.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import pyarrow.fs as pafs

from tapeline.data.registry import DATASETS
from tapeline.errors import ConfigError
from tapeline.storage.root import is_remote, remote_filesystem

DEFAULT_STORAGE = "./artifacts"
STORAGE_ENV = "TAPELINE_STORAGE"
DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")

# A run name becomes a directory under <storage>/runs: keep it one plain path segment.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")




def _help(text: str, **extra):
    return {"help": text, **extra}


@dataclass(frozen=True)
class RunConfig:
    dataset: str = field(default="mnist", metadata=_help("dataset to train on", choices=tuple(DATASETS)))
    source: str | None = field(
        default=None,
        metadata=_help("URL or local directory to take the dataset files from instead of the built-in mirrors"),
    )
    storage: str | None = field(
        default=None, metadata=_help(f"root for everything the pipeline writes (default ${STORAGE_ENV} or {DEFAULT_STORAGE})")
    )
    run_name: str | None = field(default=None, metadata=_help("run id; default: a timestamp and a random suffix"))
    prepare_on: str | None = field(
        default=None,
        metadata=_help("download and preprocess first as this deployment of prepare-data (e.g. prepare-data/cpu), on its worker"),
    )
    refresh: bool = field(
        default=False, metadata=_help("download and preprocess again even when the storage root already has the result")
    )
    epochs: int = field(default=5, metadata=_help("passes over the training split"))
    batch_size: int = field(default=32, metadata=_help("samples per training step"))
    learning_rate: float = field(default=1e-3, metadata=_help("Adam learning rate"))
    seed: int = field(default=42, metadata=_help("seed for the validation split, data order and initial weights"))
    train_limit: int | None = field(default=None, metadata=_help("use only the first N training samples (smoke runs)"))
    validation_size: int = field(default=5000, metadata=_help("training samples held out for validation"))
    snapshot_every: int = field(default=250, metadata=_help("full gradient snapshot every N steps"))
    snapshot_weights: bool = field(
        default=False, metadata=_help("store each scheduled snapshot's weights (before the update) beside its gradients")
    )
    gradient_dtype: str = field(
        default="float32", metadata=_help("dtype of stored gradient values (statistics are float32)", choices=("float32", "float16"))
    )
    spike_factor: float = field(
        default=10.0, metadata=_help("also snapshot in full when the global gradient norm exceeds this many times its running median")
    )
    checkpoint_every: int = field(default=500, metadata=_help("checkpoint every N steps (and at each epoch end)"))
    promotion_margin: float = field(
        default=0.0, metadata=_help("promote the new model only if its test accuracy beats the champion's by this much")
    )
    warm_start: bool = field(
        default=False, metadata=_help("start from the current champion's weights (a champion of the same dataset), not random ones")
    )
    precision: str = field(
        default="float32",
        metadata=_help("compute precision; variables and exported gradients stay float32", choices=PRECISIONS),
    )
    jit_compile: bool = field(
        default=True, metadata=_help("compile the train step with XLA, as one fused program")
    )
    deterministic: bool = field(
        default=False, metadata=_help("deterministic ops: same seed, same machine -> identical weights and gradients")
    )
    device: str = field(default="auto", metadata=_help("where to train: auto uses a GPU when TensorFlow sees one", choices=DEVICES))
    devices: int = field(default=1, metadata=_help("train on N devices with MirroredStrategy (GPUs, else CPU cores)"))

    def validated(self) -> RunConfig:
        """Check every parameter and resolve defaults that depend on the environment.

        Leaves nothing behind: a bad parameter must leave the storage root as it was.
        """
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        for name in ("epochs", "batch_size", "snapshot_every", "checkpoint_every", "devices"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("seed", self.seed, minimum=0)
        _require_int("validation_size", self.validation_size, minimum=0)
        if self.train_limit is not None:
            _require_int("train_limit", self.train_limit, minimum=1)
        if self.gradient_dtype not in ("float32", "float16"):
            raise ConfigError(f"unknown gradient_dtype {self.gradient_dtype!r}; choose float32 or float16")
        for name in ("refresh", "snapshot_weights", "warm_start", "jit_compile", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.learning_rate, (int, float)) or not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be a number above 0, got {self.learning_rate!r}")
        if not isinstance(self.promotion_margin, (int, float)) or not 0 <= self.promotion_margin < 1:
            raise ConfigError(f"promotion_margin must be a number from 0 to below 1, got {self.promotion_margin!r}")
        if not isinstance(self.spike_factor, (int, float)) or not math.isfinite(self.spike_factor) or self.spike_factor <= 1:
            raise ConfigError(f"spike_factor must be a number above 1, got {self.spike_factor!r}")
        if self.run_name is not None and (not _RUN_NAME.fullmatch(self.run_name) or ".." in self.run_name):
            raise ConfigError(
                f"run_name {self.run_name!r} must be one path segment of letters, digits, '.', '_' or '-' (no '..')"
            )
        if self.prepare_on is not None and not re.fullmatch(r"prepare-data/[^/]+", self.prepare_on):
            raise ConfigError(f"prepare_on {self.prepare_on!r} must name a deployment of prepare-data, like prepare-data/cpu")
        storage = self.storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
        return replace(self, storage=_usable_root(storage))

    def parameters(self) -> dict:
        """Every parameter by name, as recorded in run.json."""
        return asdict(self)


def parameter_fields():
    """The run parameters, in declaration order (the CLI builds its flags from these)."""
    return fields(RunConfig)


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")


def _usable_root(storage: str) -> str:
    return _reachable_root(storage) if is_remote(storage) else str(_writable_root(storage))


def _reachable_root(storage: str) -> str:
    """Ask the object store now whether the bucket exists and takes these credentials; write nothing.

    Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, …), and
    the endpoint from AWS_ENDPOINT_URL: neither is in any message.
    """
    try:
        filesystem, path = remote_filesystem(storage)
        bucket = path.split("/")[0]
        if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ConfigError(f"storage {storage!r}: bucket {bucket!r} does not exist")
        filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))  # listing needs read access
    except (OSError, ValueError, ImportError) as error:
        if isinstance(error, ConfigError):
            raise
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
