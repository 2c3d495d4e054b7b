"""gc-flow: `tapeline gc` as a flow, for the weekly `storage-gc` deployment (deployments/prefect.yaml).

Deletes what the retention policy does not keep (tapeline/registry/retention.py: never the
champion, its lineage, or a run being written), then shows what went as the table artifact
`storage-gc` and publishes the model registry anew, which lists only the runs that are left.
Without `delete` it deletes nothing and the table lists what it would delete.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from tapeline import config as param  # the parameters' types: constraints and help
from tapeline.config import RetentionPolicy, storage_root
from tapeline.registry.retention import Removal, collect, kept_lines, plan, removal_line, total_line
from tapeline.storage.access import existing_root
from tapeline.storage.root import Storage
from tapeline.tasks.failures import log_expected_failures_without_traceback
from tapeline.tasks.promote import publish_model_registry
from tapeline.tasks.runs import with_parameter_help

log_expected_failures_without_traceback()


@flow(name="gc-flow", log_prints=True)
@with_parameter_help
def gc_flow(
    storage: param.StorageRoot = None,
    keep_last: param.KeepLast = RetentionPolicy.keep_last,
    older_than: param.OlderThan = RetentionPolicy.older_than,
    delete: param.Delete = False,
) -> dict:
    """Delete the runs, cache entries and prepared datasets the retention policy does not keep; returns what went."""
    policy = RetentionPolicy(keep_last, older_than).validated()
    root = Storage(existing_root(storage_root(storage)))
    planned = plan(root, policy)
    print("\n".join(kept_lines(planned)))
    if delete:
        removals = collect(root, planned, on_removed=lambda removal: print(removal_line(removal, "deleted")))
        publish_model_registry(root.uri)
    else:
        removals = list(planned.removals)
        print("\n".join(removal_line(removal, "delete") for removal in removals))
    total = total_line(removals, dry_run=not delete)
    print(total)
    rows = removal_rows(removals)
    create_table_artifact(key="storage-gc", table=rows, description=total)
    return {"deleted": delete, "bytes": rows[-1]["bytes"], "removals": rows[:-1]}


def removal_rows(removals: list[Removal]) -> list[dict]:
    """What went (or would go), a row each, and the total bytes in a last row."""
    rows = [
        {"removed": removal.kind, "name": removal.name, "age_days": round(removal.age_days, 1), "bytes": removal.bytes, "why": removal.why}
        for removal in removals
    ]
    return rows + [{"removed": "total", "name": f"{len(removals)} items", "age_days": None, "bytes": sum(r.bytes for r in removals), "why": ""}]


if __name__ == "__main__":
    gc_flow()
