"""Label issues from training's own dynamics: one row per training example, which labels look wrong.

Everything comes from the run's samples dataset (one row per step and example: the
example's `margin`, `p_label`, `correct`, `loss` and `grad_norm` at that step, before the
update; docs/data-format.md), read with pyarrow and aggregated with numpy. No extra
training, no model: a run's label issues are a function of what it recorded.

Per example (`example_dynamics`):
- `aum`: the area under the margin (Pleiss et al. 2020), the mean over every step the
  example was in of its label's logit minus the largest other logit;
- `confidence`, `variability`: the mean and the standard deviation over epochs of the
  example's mean `p_label` in each epoch (Data Maps, Swayamdipta et al. 2020);
- `forgetting`: how many times it went from predicted right to predicted wrong between
  two consecutive steps it was in (Toneva et al. 2019);
- `mean_loss`, `mean_grad_norm`: over every step it was in;
- `predicted`: its class at the latest of them.

All of them read the epochs before memorisation (`learning_epochs`): up to the one with the
lowest validation loss. A network fits the clean labels first and the wrong ones later
(Arpit et al. 2017); once the validation loss turns up it is memorising them, and a wrong
label's loss and margin there look like a clean one's.

The combined `score` (`combined_score`) ranks them; the estimated count N of wrong labels
(`estimated_count`) flags the N highest scores, so the flagged examples are exactly the
top of the ranking. benchmarks/label_noise.py measures both, docs/performance.md has the
numbers and why these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tapeline import reader
from tapeline.errors import TapelineError
from tapeline.gradients.hardest import render_hardest, split_images
from tapeline.gradients.plotting import save_png
from tapeline.storage.layout import locate_run
from tapeline.storage.root import Storage

TOP = 32  # suspects in the picture

NEEDED = ("step", "epoch", "sample_id", "label", "predicted", "correct", "loss", "grad_norm", "margin", "p_label")
SIGNALS = ("aum", "confidence", "variability", "forgetting", "mean_loss", "mean_grad_norm")
LABEL_ISSUES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("label", pa.uint16()),
        ("predicted", pa.uint16()),  # at the example's latest step of the epochs read
        ("aum", pa.float32()),
        ("confidence", pa.float32()),
        ("variability", pa.float32()),
        ("forgetting", pa.int32()),
        ("mean_loss", pa.float32()),
        ("mean_grad_norm", pa.float32()),
        ("seen", pa.int32()),  # steps the example was in
        ("score", pa.float32()),  # higher: more likely mislabeled
        ("rank", pa.int32()),  # 1: the highest score
        ("flagged", pa.bool_()),
    ]
)


class LabelIssuesError(TapelineError):
    """The run's samples cannot give label issues: none recorded, or recorded before `margin` and `p_label` existed."""


@dataclass(frozen=True)
class LabelIssues:
    """A run's label issues: the table (rows in rank order) and what run.json records of it."""

    table: pa.Table
    method: str
    epochs: list[int]  # the epochs read

    @property
    def estimated(self) -> int:
        """The estimated number of wrong labels among the training examples: the flagged ones."""
        return int(np.count_nonzero(self.table.column("flagged").to_numpy(zero_copy_only=False)))

    @property
    def examples(self) -> int:
        return self.table.num_rows

    def record(self, uri: str) -> dict:
        """run.json's `label_issues`."""
        return {"estimated": self.estimated, "examples": self.examples, "method": self.method, "epochs": self.epochs, "uri": uri}


def learning_epochs(history: list[dict]) -> list[int]:
    """The epochs of a run's `history` (TrainedModel.epochs) that its label issues read: up to and including the first
    with the lowest validation loss, where memorising the wrong labels begins; all of them without a validation split."""
    epochs = [row["epoch"] for row in history]
    losses = [row["val_loss"] for row in history]
    if not epochs or None in losses:
        return epochs
    return epochs[: losses.index(min(losses)) + 1]


def read_dynamics_rows(run: str | Path, epochs: list[int] | None = None) -> pa.Table:
    """The run's samples of `epochs` (default: all), the columns the label issues need; LabelIssuesError when it has no
    margins."""
    table = reader.read_samples(run, epochs, columns=list(NEEDED))
    if table.num_rows == 0:
        raise LabelIssuesError(f"{run} has no per-example rows")
    if table.column("margin").null_count == table.num_rows:
        raise LabelIssuesError(f"{run} was recorded before the samples had `margin` and `p_label`: its label issues cannot be computed")
    return table


def example_dynamics(rows: pa.Table) -> dict[str, np.ndarray]:
    """Per training example (sorted by sample_id): `sample_id`, `label`, `predicted`, `seen` and the SIGNALS."""
    step = rows.column("step").to_numpy()
    ids, example = np.unique(rows.column("sample_id").to_numpy(), return_inverse=True)
    n = len(ids)
    seen = np.bincount(example, minlength=n)

    def mean(name: str) -> np.ndarray:
        return np.bincount(example, rows.column(name).to_numpy().astype(np.float64), n) / seen

    # In step order per example: its latest row, and its correct -> wrong transitions.
    order = np.lexsort((step, example))
    ordered, correct = example[order], rows.column("correct").to_numpy(zero_copy_only=False)[order]
    latest = order[np.r_[ordered[1:] != ordered[:-1], True]]
    forgotten = (ordered[1:] == ordered[:-1]) & correct[:-1] & ~correct[1:]
    # Per (example, epoch): the mean p_label; then its mean and standard deviation over the epochs the example was in.
    epochs, epoch = np.unique(rows.column("epoch").to_numpy(), return_inverse=True)
    cell = example * len(epochs) + epoch
    counts = np.bincount(cell, minlength=n * len(epochs)).reshape(n, -1)
    sums = np.bincount(cell, rows.column("p_label").to_numpy().astype(np.float64), n * len(epochs)).reshape(n, -1)
    per_epoch = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return {
        "sample_id": ids,
        "label": rows.column("label").to_numpy()[latest],
        "predicted": rows.column("predicted").to_numpy()[latest],
        "seen": seen,
        "aum": mean("margin"),
        "confidence": np.nanmean(per_epoch, axis=1),
        "variability": np.nanstd(per_epoch, axis=1),
        "forgetting": np.bincount(ordered[1:][forgotten], minlength=n),
        "mean_loss": mean("loss"),
        "mean_grad_norm": mean("grad_norm"),
    }


CONFIDENCE_CEILING = 0.25  # a flagged label has, on average over the epochs read, less than this probability
COMPONENTS = 3  # clean and easy, clean and hard, wrong
PAIR_PRIOR = 5  # a pair's share of wrong labels starts from the run's, as if from this many examples
SCORE_METHOD = (
    "score: z(-aum) + z(mean_loss) + z(the log odds of a wrong label among the examples of its (given, predicted) pair); "
    f"flagged: the top N by score, N the examples in the upper component of a {COMPONENTS}-component Gaussian mixture on "
    f"logit(1 - confidence) with confidence below {CONFIDENCE_CEILING:g}"
)
EM_ITERATIONS = 300


def combined_score(dynamics: dict[str, np.ndarray], wrong: np.ndarray) -> np.ndarray:
    """Higher: more likely mislabeled. The sum of three standardized signals over the run's examples (each its z-score,
    so none's scale dominates): the negated AUM, the mean loss, and how often a label is wrong among the examples of its
    (given, predicted) pair (`pair_log_odds`)."""
    return _z(-dynamics["aum"]) + _z(dynamics["mean_loss"]) + _z(pair_log_odds(dynamics, wrong))


def pair_log_odds(dynamics: dict[str, np.ndarray], wrong: np.ndarray) -> np.ndarray:
    """Per example, the log odds that a label is wrong among the examples of its (given label, predicted class) pair:
    the mean of their `wrong` posteriors, shrunk toward the run's mean by PAIR_PRIOR examples. Where the network
    confuses two classes that look alike (shirt and T-shirt), many clean labels sit in the pair and one example's low
    confidence says less than where it never does (sneaker given, trouser predicted): the noise counted per pair of
    given and true class, as in confident learning (Northcutt et al. 2021)."""
    label, predicted = dynamics["label"].astype(np.int64), dynamics["predicted"].astype(np.int64)
    _, pair = np.unique(label * (max(label.max(), predicted.max()) + 1) + predicted, return_inverse=True)
    rate = (np.bincount(pair, wrong) + PAIR_PRIOR * wrong.mean()) / (np.bincount(pair) + PAIR_PRIOR)
    return np.log(rate[pair] + 1e-4) - np.log(1 - rate[pair] + 1e-4)


def wrong_posterior(dynamics: dict[str, np.ndarray]) -> np.ndarray:
    """Per example, the posterior that its label is wrong: of the upper component of a Gaussian mixture of COMPONENTS
    on logit(1 - confidence), and zero at a confidence of CONFIDENCE_CEILING or more. Clean examples sit low,
    confidently right, the easy ones lower than the hard ones (with one component for both, the upper one took in the
    hard ones' long tail); mislabeled ones high, the model confidently preferring another class. Where classes are
    confusable the upper component also takes in the ambiguous examples, near even between two classes: hard, not
    wrong, and the ceiling keeps them (docs/performance.md has the class-conditional case that needs it)."""
    confidence = np.clip(dynamics["confidence"], 1e-6, 1 - 1e-6)
    return upper_posterior(np.log((1 - confidence) / confidence)) * (dynamics["confidence"] < CONFIDENCE_CEILING)


def estimated_count(wrong: np.ndarray) -> int:
    """How many labels look wrong: the examples whose `wrong_posterior` is above one half."""
    return int(np.count_nonzero(wrong > 0.5))


def upper_posterior(x: np.ndarray, components: int = COMPONENTS) -> np.ndarray:
    """Each value's posterior of the upper component of a 1-D Gaussian mixture of `components`, fit by EM from means
    spread over the values' percentiles 10 to 99.5 (zeros when the values do not spread)."""
    x = np.asarray(x, np.float64)
    if len(x) < components or np.ptp(x) == 0:
        return np.zeros(len(x))
    spread = x.std()
    mean, sd, weight = np.percentile(x, np.linspace(10, 99.5, components)), np.full(components, spread), np.full(components, 1 / components)
    for _ in range(EM_ITERATIONS):
        density = weight * np.exp(-0.5 * ((x[:, None] - mean) / sd) ** 2) / sd
        responsibility = density / np.maximum(density.sum(axis=1, keepdims=True), 1e-300)
        total = responsibility.sum(axis=0) + 1e-12
        weight, mean = total / len(x), (responsibility * x[:, None]).sum(axis=0) / total
        sd = np.sqrt((responsibility * (x[:, None] - mean) ** 2).sum(axis=0) / total) + 1e-3 * spread
    return responsibility[:, int(np.argmax(mean))]


def _z(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros(len(values))


def label_issues(run: str | Path, epochs: list[int] | None = None) -> LabelIssues:
    """The run's label issues, computed from its samples dataset: of `epochs` (`learning_epochs`), or of all its epochs."""
    rows = read_dynamics_rows(run, epochs)
    dynamics = example_dynamics(rows)
    wrong = wrong_posterior(dynamics)
    score = combined_score(dynamics, wrong)
    order = np.lexsort((dynamics["sample_id"], -score))  # ties: the lower sample_id first
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    columns = dynamics | {"score": score, "rank": rank, "flagged": rank <= estimated_count(wrong)}
    table = pa.table({field.name: pa.array(columns[field.name], field.type) for field in LABEL_ISSUES_SCHEMA}, schema=LABEL_ISSUES_SCHEMA)
    read = sorted(pc.unique(rows.column("epoch")).to_pylist())
    return LabelIssues(table.take(order), f"{SCORE_METHOD}; over epochs {reader.spans(read)}", read)


@dataclass(frozen=True)
class LabelIssuesReport:
    issues: LabelIssues
    uri: str  # the label_issues.parquet
    grid: PurePath  # the picture of the top suspects, under the run
    grid_png: bytes


def write_label_issues(storage: Storage, run_id: str, train_uri: str, classes, history: list[dict], top: int = TOP) -> LabelIssuesReport:
    """Compute the run's label issues over its `learning_epochs(history)`, write `label_issues.parquet` and the picture
    of its `top` suspects under the run."""
    run = storage.layout.run(run_id)
    issues = label_issues(storage.uri_of(run.directory), learning_epochs(history))
    with storage.atomic(run.label_issues) as temporary:
        pq.write_table(issues.table, temporary)
    suspects = issues.table.slice(0, top)
    ids = suspects.column("sample_id").to_numpy()
    grid = render_hardest(
        split_images(train_uri, ids), suspects.column("label").to_numpy(), suspects.column("predicted").to_numpy(),
        suspects.column("score").to_numpy(), classes, value_name="score",
        title=f"Run {run_id}: the {len(ids)} most suspect labels; {issues.estimated:,} of {issues.examples:,} training labels estimated wrong",
        key="each tile: its given label / the class predicted at its latest step read (red and framed: another) / its label-issue score",
    )  # fmt: skip
    save_png(storage, run.label_issues_plot, grid)
    return LabelIssuesReport(issues, storage.uri_of(run.label_issues), run.label_issues_plot, grid)


def read_label_issues(run: str | Path, top: int | None = None, label: int | None = None) -> pa.Table:
    """A completed run's label_issues table, in rank order: its first `top` rows, of the given `label` only if asked.
    NoGradientsError when the run has none; NotInRunError when it has no training example of that label."""
    filesystem, paths = locate_run(run)
    try:
        table = pq.read_table(str(paths.label_issues), filesystem=filesystem)
    except FileNotFoundError:
        raise reader.NoGradientsError(f"{run} has no {paths.label_issues.name} (written when a run with per-example norms completes)") from None
    except (OSError, pa.ArrowInvalid) as error:
        raise reader.CorruptFileError(f"{paths.label_issues}: cannot read it, the file is truncated or corrupt ({error})") from None
    if label is not None:
        labels = pc.unique(table.column("label")).to_pylist()
        if label not in labels:
            raise reader.NotInRunError(f"run {paths.run_id} has no training example of label {label}; its labels are {reader.spans(labels)}")
        table = table.filter(pc.field("label") == label)
    return table.slice(0, top) if top is not None else table
