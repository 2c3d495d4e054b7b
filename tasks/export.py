"""Stage 4, export_gradients: check and publish the run's snapshots; report in Prefect their norms, the hardest
examples and the gradient noise scale, each an artifact of its own."""

from __future__ import annotations

import base64
import math

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tapeline.gradients.export import plot_norms, publish_gradients
from tapeline.gradients.hardest import HardestReport, write_hardest_report
from tapeline.gradients.noise import NOISE_SCALE_METRIC
from tapeline.gradients.noise_report import NoiseReport, write_noise_report
from tapeline.manifest import suggested_batch_size
from tapeline.reader import NoGradientsError
from tapeline.results import GradientExport, TrainedModel
from tapeline.storage.root import Storage


@task(name="export_gradients")
def export_gradients(storage: str, trained: TrainedModel, train_uri: str, classes: tuple[str, ...]) -> GradientExport:
    """Publish the run's gradient snapshots and report per-variable shape and L2 norm; with per-example norms, the
    hardest examples and the noise scale too."""
    root = Storage(storage)
    exported = publish_gradients(root, trained)
    anomalies = ", ".join(f"step {a['step']} ({a['reason']})" for a in exported.anomalies) or "none"
    create_table_artifact(
        key="gradient-norms",
        table=norms_table(exported.variables),
        description=f"Gradient L2 norms of run `{trained.run_id}` over {len(exported.steps)} snapshots "
        f"(last: step {exported.steps[-1]}); anomalies: {anomalies}. Data: `{exported.uri}`",
    )
    plot = plot_norms(root, trained.run_id)
    create_markdown_artifact(
        key="gradient-norm-plot",
        markdown=f"## Gradient norms per layer, run `{trained.run_id}`\n\n{embedded_png('gradient norms', plot)}\n\n"
        f"Anomalies: {anomalies}. Saved as `{root.uri_of(root.layout.run(trained.run_id).norm_plot)}`.",
        description="gradient L2 norm per layer and step",
    )
    try:
        hardest, noise = write_hardest_report(root, trained.run_id, train_uri, classes), write_noise_report(root, trained.run_id)
    except NoGradientsError as error:  # trained without per-example norms
        print(f"hardest examples and noise scale: not reported, {error}")
        return exported
    create_markdown_artifact(key="hardest-examples", markdown=hardest_markdown(root, trained.run_id, hardest),
                             description="the training examples with the highest mean gradient norm in the last epoch")  # fmt: skip
    create_markdown_artifact(key="noise-scale", markdown=noise_markdown(root, trained.run_id, noise),
                             description=f"gradient noise scale B_simple per step; {NOISE_SCALE_METRIC}")  # fmt: skip
    return exported


def norms_table(variables: list[dict]) -> list[dict]:
    """The manifest's per-variable norms for a person: the shape as 3×3×1×32, norms to 4 significant digits."""
    return [
        {
            "variable": row["variable"],
            "shape": "×".join(map(str, row["shape"])),
            **{f"{which} L2 norm": float(f"{row[f'{which}_l2_norm']:.4g}") for which in ("last", "mean", "max")},
        }
        for row in variables
    ]


def embedded_png(alt: str, png: bytes) -> str:
    """A PNG inside an artifact's markdown, as a data: URI (the Prefect UI shows it; no server to host it on)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def hardest_markdown(root: Storage, run_id: str, report: HardestReport) -> str:
    """The grid, what its predictions are, and the ranking as `tapeline samples --top 32` prints it."""
    examples = report.examples
    rows = [
        f"| {rank} | {sample_id} | {examples.classes[label]} | {examples.predicted_name(rank - 1)} | {step} | {norm:.4f} |"
        for rank, (sample_id, label, step, norm) in enumerate(zip(examples.sample_ids, examples.labels, examples.latest_steps, examples.mean_norms), 1)
    ]
    return "\n\n".join([
        f"## Hardest examples, run `{run_id}`",
        embedded_png("hardest examples", report.grid_png),
        f"The {len(examples.sample_ids)} training examples with the highest mean per-example gradient norm over epoch "
        f"{examples.epoch}, the last. Each one's prediction is the model's at its latest step of that epoch, before "
        f"that step's update, as `tapeline samples` shows it: {examples.wrong} of them were predicted wrongly (in red). "
        "Large norms mark examples the model fits worst: often mislabeled, ambiguous or unusual.",
        "\n".join(["| rank | sample_id | label | predicted | at step | mean ‖g‖ |", "|---:|---:|---|---|---:|---:|", *rows]),
        f"Saved as `{root.uri_of(report.grid)}`.",
    ]) + "\n"  # fmt: skip


def noise_markdown(root: Storage, run_id: str, report: NoiseReport) -> str:
    history = report.history
    median, suggested = history.median_last_epoch, suggested_batch_size(history.median_last_epoch)
    median_line = (
        f"- **{median:.4g}: the median over the last epoch (epoch {history.epochs.max()}) of the smoothed value**, the "
        f"segment over that epoch: run.json's `metrics.{NOISE_SCALE_METRIC}` and TensorBoard's noise scale in HParams. "
        f"It suggests a batch size of about {suggested}; this run used {history.batch_size}."
        if median is not None
        else "- no median over the last epoch: the smoothed value had none there (run.json's "
        f"`metrics.{NOISE_SCALE_METRIC}` is null)"
    )  # fmt: skip
    return "\n\n".join([
        f"## Gradient noise scale, run `{run_id}`",
        embedded_png("gradient noise scale", report.png),
        "B_simple = tr Σ / |G|², the per-example gradient's total variance over the true gradient's squared norm "
        "(McCandlish et al. 2018), estimates the critical batch size. Three statistics of it, each named where it is shown:",
        "\n".join([
            median_line,
            f"- {_number(history.smoothed_last_step)}: the smoothed value, EMA(tr Σ) / EMA(|G|²) with decay {history.decay:g}, "
            "at the last step: the end of the dark line, and of TensorBoard's `step/noise_scale_smoothed`.",
            f"- the raw value of each step (faint dots; TensorBoard's `step/noise_scale_raw`): {history.raw_not_positive:,} of "
            f"{len(history.raw):,} steps are ≤ 0 or NaN. Both estimates are differences, either can come out negative.",
        ]),
        f"Saved as `{root.uri_of(report.path)}`.",
    ]) + "\n"  # fmt: skip


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "none (the signal's average never came out positive)"
