"""Stage 4, export_gradients: check and publish the run's snapshots; report their norms in Prefect."""

from __future__ import annotations

import base64

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tapeline.gradients.export import plot_norms, publish_gradients
from tapeline.results import GradientExport, TrainedModel
from tapeline.storage.root import Storage


@task(name="export_gradients")
def export_gradients(storage: str, trained: TrainedModel) -> GradientExport:
    """Publish the run's gradient snapshots and report per-variable shape and L2 norm."""
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
    image = base64.b64encode(plot.read_bytes()).decode()
    create_markdown_artifact(
        key="gradient-norm-plot",
        markdown=f"## Gradient norms per layer, run `{trained.run_id}`\n\n![gradient norms](data:image/png;base64,{image})\n\n"
        f"Anomalies: {anomalies}. Saved as `{root.uri_of(plot)}`.",
        description="gradient L2 norm per layer and step",
    )
    return exported
