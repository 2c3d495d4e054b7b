"""After training: the run's label issues (tapeline/curation/label_issues.py) and their Prefect artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tapeline.curation.label_issues import LabelIssuesReport, write_label_issues
from tapeline.storage.root import Storage
from tapeline.tasks.export import embedded_png


@task(name="label_issues")
def report_label_issues(storage: str, run_id: str, train_uri: str, classes: tuple[str, ...], history: list[dict]) -> dict:
    """Write the run's label_issues table and picture (over the epochs before memorisation, read from its `history`);
    the artifact; run.json's `label_issues`."""
    root = Storage(storage)
    report = write_label_issues(root, run_id, train_uri, classes, history)
    issues = report.issues
    print(f"label issues: {issues.estimated:,} of {issues.examples:,} training labels estimated wrong ({issues.method})")
    create_markdown_artifact(key="label-issues", markdown=label_issues_markdown(root, run_id, report, classes),
                             description="the training labels that look wrong, from training's own dynamics")  # fmt: skip
    return issues.record(report.uri)


def label_issues_markdown(root: Storage, run_id: str, report: LabelIssuesReport, classes) -> str:
    issues = report.issues
    rows = [
        f"| {r['rank']} | {r['sample_id']} | {classes[r['label']]} | {classes[r['predicted']]} | {r['score']:.3f} | {r['aum']:.2f} | "
        f"{'yes' if r['flagged'] else ''} |"
        for r in issues.table.slice(0, 32).to_pylist()
    ]
    return "\n\n".join([
        f"## Label issues, run `{run_id}`",
        f"**{issues.estimated:,} of {issues.examples:,} training labels ({issues.estimated / max(issues.examples, 1):.2%}) are estimated wrong** "
        f"and flagged: the top {issues.estimated:,} below. A later run leaves them out with `--exclude {run_id}` (or `--exclude auto` once this "
        f"run is the champion). Method: {issues.method}.",
        embedded_png("most suspect labels", report.grid_png),
        "\n".join(["| rank | sample_id | given | predicted | score | AUM | flagged |", "|---:|---:|---|---|---:|---:|---|", *rows]),
        f"All {issues.examples:,} rows: `{report.uri}` (`tapeline label-issues {run_id}`).",
    ]) + "\n"  # fmt: skip
