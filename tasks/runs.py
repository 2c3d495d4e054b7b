"""A run in Prefect: its id (the flow run's name), its tags, the clock of its stages, and its parameters' help."""

from __future__ import annotations

import inspect
import secrets
import time
import typing
from collections.abc import Callable

from prefect import get_client
from prefect.context import FlowRunContext
from pydantic.fields import FieldInfo


def with_parameter_help(fn: Callable) -> Callable:
    """`fn`, its docstring ending in an `Args:` section of its parameters' help: the descriptions of their
    annotations (the type aliases of tapeline/config.py, whose help the CLI shows too).

    Prefect's UI describes a parameter only from there: Prefect's own field overrides
    the description in the annotation. Apply it under `@flow`.
    """
    annotations = typing.get_type_hints(fn, include_extras=True)
    lines = [f"    {name}: {FieldInfo.from_annotation(annotations[name]).description}" for name in inspect.signature(fn).parameters]
    fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n" + "\n".join(lines)
    return fn


def choose_run_id(run_name: str | None) -> str:
    """The run's id: its run_name, else `new_run_id()`."""
    return run_name or new_run_id()


def flow_run_name() -> str:
    """train-flow's `flow_run_name`: the run id, so Prefect's run list and `<storage>/runs/` line up.

    Prefect calls it in the flow run's context before the flow body runs, and again
    on a retry, which keeps the flow run's creation time, id and parameters: both
    calls, and the body's, give the same id.
    """
    return choose_run_id(FlowRunContext.get().parameters.get("run_name"))


def tag_flow_run(*tags: str) -> None:
    """Add tags to the current flow run, keeping those it has (Prefect's `tags` context only tags runs created inside it)."""
    flow_run = FlowRunContext.get().flow_run
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=list(dict.fromkeys([*flow_run.tags, *tags])))


def new_run_id() -> str:
    """The id of a run given no run_name: its flow run's creation time and id.

    A retried flow run (`prefect flow-run retry`) keeps both, so its training
    finds the checkpoints of the attempt that died and resumes from them.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:  # called outside a flow run
        return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
    return f"{context.flow_run.created:%Y%m%d-%H%M%S}-{context.flow_run.id.hex[:6]}"


class StageClock:
    """Runs the pipeline's stages in order and keeps, per stage, its seconds and cache status.

    `before_each` runs before every stage (the run lease's check: a process that lost it stops there).
    """

    def __init__(self, before_each=lambda: None):
        self.record: dict[str, dict] = {}
        self._before_each = before_each

    def run(self, stage, *args):
        self._before_each()
        started = time.perf_counter()
        result = stage(*args)
        self.record[stage.name] = {
            "seconds": round(time.perf_counter() - started, 3),
            "cached": bool(getattr(result, "cached", False)),
        }
        return result
