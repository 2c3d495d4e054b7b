"""Before training, with `exclude`: which training examples the run leaves out, recorded once, said in one line and an artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tapeline.curation.exclusion import ExclusionChoice, curation_line, run_curation
from tapeline.data.splits import read_split
from tapeline.storage.root import Storage


@task(name="curate")
def curate(storage: str, run_id: str, choice: ExclusionChoice, train_set: str, train_uri: str, train_limit: int | None) -> dict:
    """run.json's `curation` for the run (read back on a resume); prints what is left out and from which run."""
    train_ids = read_split(train_uri, train_limit)[2]
    curation = run_curation(Storage(storage), run_id, choice, train_set, train_ids)
    line = curation_line(curation, len(train_ids))
    print(line)
    source = f"run `{curation['source_run']}` (`{curation['label_issues']}`)" if curation["source_run"] else "no run"
    create_markdown_artifact(
        key="curation",
        markdown=f"## Curation, run `{run_id}`\n\n{line}.\n\n- left out: **{curation['count']:,}** of {len(train_ids):,} training "
        f"examples\n- from: {source}\n- digest of the ids left out: `{curation['digest']}`\n\nValidation and test are untouched.\n",
        description="the training examples this run leaves out (--exclude)",
    )
    return curation
