"""Stage 4, export_gradients: check and publish the run's snapshots; report their norms, the hardest examples and the
gradient noise scale in Prefect."""

from __future__ import annotations

import base64

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tapeline.gradients.export import plot_norms, publish_gradients
from tapeline.gradients.hardest import HardestReport, write_hardest_report
from tapeline.reader import NoGradientsError
from tapeline.results import GradientExport, TrainedModel
from tapeline.storage.root import Storage


@task(name="export_gradients")
def export_gradients(storage: str, trained: TrainedModel, train_uri: str, classes: tuple[str, ...]) -> GradientExport:
    """Publish the run's gradient snapshots and report per-variable shape and L2 norm; with a trained model, the
    hardest examples and the noise scale too."""
    root = Storage(storage)
    exported = publish_gradients(root, trained)
    anomalies = ", ".join(f"step {a['step']} ({a['reason']})" for a in exported.anomalies) or "none"
    create_table_artifact(
        key="gradient-norms",
        table=exported.variables,
        description=f"Gradient L2 norms of run `{trained.run_id}` over {len(exported.steps)} snapshots "
        f"(last: step {exported.steps[-1]}); anomalies: {anomalies}. Data: `{exported.uri}`",
    )
    plot = plot_norms(root, trained.run_id)
    create_markdown_artifact(
        key="gradient-norm-plot",
        markdown=f"## Gradient norms per layer, run `{trained.run_id}`\n\n{embedded_png('gradient norms', plot.read_bytes())}\n\n"
        f"Anomalies: {anomalies}. Saved as `{root.uri_of(plot)}`.",
        description="gradient L2 norm per layer and step",
    )
    if trained.model_uri is None:  # training stopped on a non-finite value: no model to predict with
        print("hardest examples: not reported, training left no model")
        return exported
    try:
        report = write_hardest_report(root, trained.run_id, train_uri, classes)
    except NoGradientsError as error:  # trained without per-example norms
        print(f"hardest examples: not reported, {error}")
        return exported
    create_markdown_artifact(key="hardest-examples", markdown=hardest_markdown(root, trained.run_id, report),
                             description="training examples with the highest gradient norms; gradient noise scale")  # fmt: skip
    return exported


def embedded_png(alt: str, png: bytes) -> str:
    """A PNG inside an artifact's markdown, as a data: URI (the Prefect UI shows it; no server to host it on)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def hardest_markdown(root: Storage, run_id: str, report: HardestReport) -> str:
    examples = report.examples
    wrong = int((examples.labels != examples.predictions).sum())
    ids = ", ".join(str(i) for i in examples.sample_ids)
    return "\n\n".join([
        f"## Hardest examples, run `{run_id}`",
        embedded_png("hardest examples", report.grid_png),
        f"The {len(examples.sample_ids)} training examples with the highest mean per-example gradient norm over the last "
        f"epoch; the trained model predicts {wrong} of them wrongly (in red). Large norms mark examples "
        f"the model fits worst: often mislabeled, ambiguous or unusual. Sample ids, hardest first: {ids}.",
        "## Gradient noise scale",
        embedded_png("gradient noise scale", report.noise_png),
        f"B_simple = tr Σ / |G|², per step (faint) and smoothed; at the last step the smoothed value is "
        f"{report.noise_scale:.4g} examples, the batch size used {report.batch_size}. "
        f"Saved as `{root.uri_of(report.grid)}` and `{root.uri_of(report.noise)}`.",
    ]) + "\n"  # fmt: skip
