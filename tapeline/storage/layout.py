"""The storage layout: what lives where under a storage root. The one place that names its files.

    cache/<dataset>/<sha256>.gz             dataset files (IDX, or decoded images), content-addressed
    datasets/<dataset>/<key>/               preprocessed splits: train/validation/test.parquet
    datasets/<dataset>/<key>.manifest.json  their manifest, written last: the splits are complete
    datasets/<dataset>/<key>.deleting       while gc deletes them, the manifest first (tapeline/registry/retention.py)
    models/current                          the champion pointer: run id, dataset, model path, test accuracy
    runs/<run_id>/run.json                  the run manifest: parameters, data digests, metrics, uris
    runs/<run_id>/model.keras               the trained model (takes raw uint8 pixels)
    runs/<run_id>/model.json                its model card: input, outputs, class names, test accuracy
    runs/<run_id>/gradients/                epoch=N/step-NNNNNNNNN.parquet: full snapshots, one row per variable
    runs/<run_id>/gradients.manifest.json   the complete snapshots, written last by export_gradients
    runs/<run_id>/steps/                    epoch=N/steps-NNNNNNNNN.parquet: one row per training step
    runs/<run_id>/stats/                    epoch=N/stats-NNNNNNNNN.parquet: one row per step and variable
    runs/<run_id>/samples/                  epoch=N/samples-NNNNNNNNN.parquet: one row per step and example
    runs/<run_id>/checkpoints/              tf.train.Checkpoint files: resume state, deleted once run.json is written
    runs/<run_id>/tensorboard/              TensorBoard events: scalars, histograms, hparams
    runs/<run_id>/gradient_norms.png        every layer's gradient norm at every step (by export_gradients)
    runs/<run_id>/hardest_examples.png      the training examples with the highest mean gradient norm (last epoch)
    runs/<run_id>/noise_scale.png           the gradient noise scale at every step: raw, smoothed, its median
    runs/<run_id>/label_issues.parquet      one row per training example: its training dynamics, score, rank, flagged
    runs/<run_id>/label_issues.png          the top suspects: image, given -> predicted class, score
    runs/<run_id>/curation.json             --exclude: which examples training leaves out, chosen before it starts
    runs/<run_id>/cluster.json              multi-worker training only: the chief's job for the other workers
    runs/<run_id>/.lease                    who is writing the run, while it is (tapeline/storage/lease.py)
    runs/<run_id>/.deleting                 while gc deletes the run, its run.json first (tapeline/registry/retention.py)

docs/data-format.md shows this tree as it is here (`python -m tapeline.storage.layout`
prints it; a test checks the two agree), and describes every file in it.

Every directory above holds only what its name says: a dataset directory's
manifest sits beside it (`<directory>.manifest.json`), so pyarrow, DuckDB and
Polars read the directory as it is. How files get there whole is the business of
tapeline/storage/root.py.

`Layout` gives the places of a root, `RunPaths` those of one run. Their paths are
of whatever kind the root's are: working-copy `Path`s under a `Storage`'s root,
or keys of an object store for a run `locate_run` found there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs

MANIFEST_SUFFIX = ".manifest.json"  # a dataset directory's manifest is <directory>.manifest.json, beside it
DELETING_SUFFIX = ".deleting"  # a prepared dataset being deleted has <directory>.deleting beside it
RUN_JSON = "run.json"
MODEL_CARD = "model.json"
LOCAL = pafs.LocalFileSystem()  # the local filesystem, as pyarrow sees it


def manifest_path(directory: PurePath) -> PurePath:
    """The manifest of a dataset directory: beside it, so the directory holds nothing but the dataset's files."""
    return directory.with_name(directory.name + MANIFEST_SUFFIX)


@dataclass(frozen=True)
class RunPaths:
    """The files of one run, under its directory `runs/<run_id>/`."""

    directory: PurePath

    @property
    def run_id(self) -> str:
        return self.directory.name

    @property
    def run_json(self) -> PurePath:
        return self.directory / RUN_JSON

    @property
    def model(self) -> PurePath:
        return self.directory / "model.keras"

    @property
    def model_card(self) -> PurePath:
        return self.directory / MODEL_CARD

    @property
    def gradients(self) -> PurePath:
        return self.directory / "gradients"

    @property
    def gradients_manifest(self) -> PurePath:
        return manifest_path(self.gradients)

    @property
    def steps(self) -> PurePath:
        return self.directory / "steps"

    @property
    def stats(self) -> PurePath:
        return self.directory / "stats"

    @property
    def samples(self) -> PurePath:
        return self.directory / "samples"

    @property
    def checkpoints(self) -> PurePath:
        return self.directory / "checkpoints"

    @property
    def checkpoint_index(self) -> PurePath:
        """TensorFlow's index of the checkpoints, written after the files it names: a run with one can resume."""
        return self.checkpoints / "checkpoint"

    @property
    def tensorboard(self) -> PurePath:
        return self.directory / "tensorboard"

    @property
    def norm_plot(self) -> PurePath:
        return self.directory / "gradient_norms.png"

    @property
    def hardest_plot(self) -> PurePath:
        return self.directory / "hardest_examples.png"

    @property
    def noise_plot(self) -> PurePath:
        return self.directory / "noise_scale.png"

    @property
    def label_issues(self) -> PurePath:
        return self.directory / "label_issues.parquet"

    @property
    def label_issues_plot(self) -> PurePath:
        return self.directory / "label_issues.png"

    @property
    def curation(self) -> PurePath:
        return self.directory / "curation.json"

    @property
    def cluster_job(self) -> PurePath:
        return self.directory / "cluster.json"

    @property
    def lease(self) -> PurePath:
        return self.directory / ".lease"

    @property
    def deleting(self) -> PurePath:
        return self.directory / ".deleting"

    def dataset(self, name: str) -> PurePath:
        """One of the run's Parquet datasets by name: `gradients`, `steps`, `stats` or `samples`."""
        return {"gradients": self.gradients, "steps": self.steps, "stats": self.stats, "samples": self.samples}[name]


@dataclass(frozen=True)
class DatasetPaths:
    """A preprocessed dataset: its directory of split files, and its manifest (and, while gc deletes it, a mark) beside it."""

    directory: PurePath

    @property
    def manifest(self) -> PurePath:
        return manifest_path(self.directory)

    @property
    def deleting(self) -> PurePath:
        return self.directory.with_name(self.directory.name + DELETING_SUFFIX)

    def split(self, name: str) -> PurePath:
        return self.directory / f"{name}.parquet"


@dataclass(frozen=True)
class Layout:
    """The places under a storage root."""

    root: PurePath

    @property
    def runs(self) -> PurePath:
        return self.root / "runs"

    @property
    def champion(self) -> PurePath:
        return self.root / "models" / "current"

    def run(self, run_id: str) -> RunPaths:
        return RunPaths(self.runs / run_id)

    @property
    def cache(self) -> PurePath:
        return self.root / "cache"

    @property
    def datasets(self) -> PurePath:
        return self.root / "datasets"

    def cache_file(self, dataset: str, sha256: str) -> PurePath:
        return self.cache / dataset / f"{sha256}.gz"

    def dataset(self, dataset: str, key: str) -> DatasetPaths:
        return DatasetPaths(self.datasets / dataset / key)


def is_remote(root: str) -> bool:
    """An object store or other non-local filesystem: anything with a scheme but file://."""
    return "://" in root and not root.startswith("file://")


def remote_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a URI: pyarrow's own (s3, gs, hdfs), else fsspec's (credentials from the environment)."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:  # a scheme pyarrow does not know natively
        import fsspec

        filesystem, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


def locate_run(run: str | Path) -> tuple[pafs.FileSystem, RunPaths]:
    """A run given as its directory or its run.json, local or in an object store (`s3://…/runs/<id>`):
    the filesystem that holds it, and its paths there (read in place, nothing downloaded)."""
    text = str(run).rstrip("/").removesuffix("/" + RUN_JSON)
    if is_remote(text):
        filesystem, directory = remote_filesystem(text)
        return filesystem, RunPaths(PurePosixPath(directory))
    return LOCAL, RunPaths(Path(text).expanduser().resolve())


def run_location(storage: str, run_id: str) -> str:
    """Where run `run_id` of the storage root `storage` (a directory or a URI) is, as `locate_run` takes it."""
    if is_remote(storage):
        scheme, path = storage.split("://", 1)
        return f"{scheme}://{Layout(PurePosixPath(path)).run(run_id).directory}"
    return str(Layout(Path(storage.removeprefix("file://")).expanduser()).run(run_id).directory)


def layout_tree() -> str:
    """The tree of this module's docstring, under `<storage>/`, as docs/data-format.md shows it."""
    lines = [line.removeprefix("    ") for line in __doc__.splitlines() if line.startswith("    ") and line.strip()]
    return "\n".join(["<storage>/", *("  " + line for line in lines)]) + "\n"


if __name__ == "__main__":
    print(layout_tree(), end="")
