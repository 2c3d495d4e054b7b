"""The command line: `tapeline train | models | verify | samples | label-issues | worker | gc`.

Each command reads and checks its arguments before it imports anything heavy:
`--help` and a bad flag answer at once, and `tapeline train` imports the flow (and
so TensorFlow and Prefect) only once its parameters are good. An expected failure
ends in one line, `<command>: error: …`, and exit code 2 for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import signal
import sys
import typing

from tapeline.config import (
    DEFAULT_STORAGE,
    STORAGE_ENV,
    Delete,
    RetentionPolicy,
    RunConfig,
    retention_parameters,
    run_parameters,
    storage_root,
)
from tapeline.errors import ConfigError, CorruptFileError, Stopped, TapelineError

COMMANDS = {
    "train": "train a model: the train-flow pipeline (`tapeline train --help` lists the parameters)",
    "models": "list the model versions of a storage root; * marks the champion",
    "verify": "recompute a recorded snapshot's gradients from its weights and batch, and compare",
    "samples": "the training examples of a run ranked by mean per-example gradient norm: the hardest first",
    "label-issues": "the training labels of a run that look wrong, the most suspect first: given, predicted, score",
    "worker": "join a multi-worker training run as a non-chief worker (TF_CONFIG)",
    "gc": "delete the runs, cache entries and prepared datasets the retention policy does not keep (a dry run without --yes)",
}
GC_METAVARS = {"keep_last": "N", "older_than": "DAYS"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")  # one line, no usage dump


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        usage = "usage: tapeline {" + ",".join(COMMANDS) + "} ...\n\n" + "\n".join(f"  {c:12} {h}" for c, h in COMMANDS.items())
        print(usage, file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command = {"train": train, "models": models, "verify": verify, "samples": samples, "label-issues": label_issues, "worker": worker, "gc": gc}[argv[0]]
    return command(argv[1:], prog=f"tapeline {argv[0]}")


def stoppable(command: typing.Callable[[list[str], str], int]) -> typing.Callable[[list[str], str], int]:
    """`command`, stopped by SIGTERM (`kill`, `docker stop`, systemd) as by Ctrl-C: an exception unwinds it, so
    what it holds is released on the way out (the run lease, Prefect's temporary API); then one line, and the
    conventional exit status 128 + the signal's number (143, 130)."""

    @functools.wraps(command)
    def run(argv: list[str], prog: str) -> int:
        try:
            with _signals_raise_stopped():
                return command(argv, prog)
        except Stopped as stop:
            print(f"{prog}: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
            return 128 + stop.signum

    return run


@contextlib.contextmanager
def _signals_raise_stopped():
    """The first SIGINT or SIGTERM raises Stopped in the main thread; a later one is ignored, so the unwinding
    completes (SIGKILL still ends it). A signal ignored on entry (`nohup`, a shell's `&`) stays ignored."""
    stopped = []

    def stop(signum: int, frame) -> None:
        if not stopped:
            stopped.append(signum)
            raise Stopped(signum)

    handled = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, stop) for s in handled}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@stoppable
def train(argv: list[str], prog: str) -> int:
    parameters = parse_train_args(argv, prog)
    from tapeline.flows import (
        train as flow,  # seconds of imports: only once the flags are known to be good
    )

    return flow.main(parameters, prog)


def parse_train_args(argv: list[str] | None, prog: str = "tapeline train") -> dict:
    """The flow's parameters from the flags; exits 2 with one line when they are not valid."""
    parser = _Parser(prog=prog, description="Train the tf.GradientTape CNN as the train-flow pipeline.")
    for p in run_parameters():
        if p.kind is bool:
            parser.add_argument(p.flag, dest=p.name, action=argparse.BooleanOptionalAction, default=p.default, help=p.help)
            continue
        default = f" (default: {p.default})" if p.default is not None else ""
        parser.add_argument(p.flag, dest=p.name, type=p.kind, default=p.default, choices=p.choices, help=p.help + default)
    args = vars(parser.parse_args(argv))
    try:
        RunConfig(**args).validated()
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return args


def models(argv: list[str], prog: str) -> int:
    parser = _Parser(prog=prog, description=COMMANDS["models"])
    parser.add_argument("storage", nargs="?", help=f"the storage root (default ${STORAGE_ENV} or {DEFAULT_STORAGE})")
    storage = storage_root(parser.parse_args(argv).storage)
    from tapeline.registry.listing import model_registry, registry_lines
    from tapeline.storage.root import Storage

    root = Storage(storage)
    if not root.remote and not root.root.is_dir():
        return _failed(prog, 2, f"no storage root at {storage}" if not root.root.exists() else f"{storage} is not a directory")
    try:
        lines = registry_lines(model_registry(root))
    except (TapelineError, OSError) as error:
        return _failed(prog, 2, error)
    for line in lines or [f"no model versions under {storage} yet: a run is listed once it has finished"]:
        print(line)
    return 0


def verify(argv: list[str], prog: str) -> int:
    parser = _Parser(prog=prog, description=COMMANDS["verify"] + "; exit 0 when within the tolerance")
    _add_run_arguments(parser)
    parser.add_argument("--step", type=int, help="snapshot step (default: the last one with weights)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted relative difference (default: 1e-4)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        parser.error(f"--tolerance must be a number of at least 0, got {args.tolerance:g}")
    try:
        run = _find_run(args)
        from tapeline.gradients.verify import compare_snapshot, snapshot_step

        report = compare_snapshot(run, snapshot_step(run, args.step))  # TensorFlow loads only for a snapshot that is there
    except (TapelineError, OSError) as error:  # OSError: a missing file, an unreachable store
        return _failed(prog, 2, error)
    for name, d in report["variables"].items():
        print(f"{name:24} max |diff| {d['max_abs_difference']:.3e}  relative {d['relative_difference']:.3e}")
    agrees = report["max_relative_difference"] <= args.tolerance
    print(f"step {report['step']}: {'agrees' if agrees else 'DIFFERS'} (largest relative difference "
          f"{report['max_relative_difference']:.3e}, tolerance {args.tolerance:g})")  # fmt: skip
    return 0 if agrees else 1


def samples(argv: list[str], prog: str) -> int:
    parser = _Parser(prog=prog, description=COMMANDS["samples"] + " (then by mean loss)")
    _add_ranking_arguments(parser, "only examples of this label")
    parser.add_argument("--epoch", type=int, help="the epoch to rank (default: the last)")
    args = _parse_ranking_arguments(parser, argv)
    from tapeline.reader import class_names, rank_samples

    try:
        run = _find_run(args)
        ranking, classes = rank_samples(run, args.epoch, args.top, args.label), class_names(run)
    except (TapelineError, OSError) as error:  # OSError: a missing file, an unreachable store
        return _failed(prog, 2, error)
    # predicted, at step: the model's class for the example at its latest step of the epoch, before that step's update
    print(f"{'rank':>4} {'sample_id':>9}  {'label':14} {'predicted':14} {'at step':>7} {'mean |g_i|':>10} {'mean loss':>9} {'seen':>4}")
    for rank, row in enumerate(ranking.to_pylist(), 1):
        print(f"{rank:>4} {row['sample_id']:>9}  {classes[row['label']]:14.14} {predicted_name(row, classes):14.14} "
              f"{row['latest_step']:>7} {row['mean_grad_norm']:>10.4f} {row['mean_loss']:>9.4f} {row['seen']:>4}")  # fmt: skip
    return 0


def label_issues(argv: list[str], prog: str) -> int:
    parser = _Parser(prog=prog, description=COMMANDS["label-issues"])
    _add_ranking_arguments(parser, "only examples given this label")
    args = _parse_ranking_arguments(parser, argv)
    from tapeline.curation.label_issues import read_label_issues
    from tapeline.reader import class_names, read_run_json

    try:
        run = _find_run(args)
        table, classes = read_label_issues(run, args.top, args.label), class_names(run)
        summary = read_run_json(run).get("label_issues") or {}
    except (TapelineError, OSError) as error:
        return _failed(prog, 2, error)
    if summary:
        print(f"{summary['estimated']:,} of {summary['examples']:,} training labels estimated wrong ({summary['method']})")
    print(f"{'rank':>5} {'sample_id':>9}  {'given':14} {'predicted':14} {'score':>7} {'aum':>7} {'flagged':>7}")
    for row in table.to_pylist():
        print(f"{row['rank']:>5} {row['sample_id']:>9}  {classes[row['label']]:14.14} {classes[row['predicted']]:14.14} "
              f"{row['score']:>7.3f} {row['aum']:>7.2f} {'yes' if row['flagged'] else 'no':>7}")  # fmt: skip
    return 0


def predicted_name(row: dict, classes: list[str]) -> str:
    """The class a ranking row's example was predicted as, by name; "?" when wrong and the run did not record which."""
    if row["latest_predicted"] is not None:
        return classes[row["latest_predicted"]]
    return classes[row["label"]] if row["latest_correct"] else "?"


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run id, looked up under --storage; or a run directory, its run.json, or s3://…/runs/<id>")
    parser.add_argument("--storage", help=f"the storage root to look a run id up in (default ${STORAGE_ENV} or {DEFAULT_STORAGE})")


def _add_ranking_arguments(parser: argparse.ArgumentParser, label_help: str) -> None:
    """RUN, --storage, and a ranking's --top and --label."""
    _add_run_arguments(parser)
    parser.add_argument("--top", type=int, default=20, help="how many examples (default: 20)")
    parser.add_argument("--label", type=int, help=label_help)


def _parse_ranking_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    return args


def _find_run(args: argparse.Namespace) -> str:
    """The run the command names, as a path or URI; NoRunError when it is not there."""
    from tapeline.reader import find_run

    return find_run(args.run, storage_root(args.storage))


@stoppable
def worker(argv: list[str], prog: str) -> int:
    parser = _Parser(prog=prog, description=COMMANDS["worker"])
    parser.add_argument("--storage", default=None, help=f"the chief's storage root (default ${STORAGE_ENV})")
    parser.add_argument("--run-name", required=True, help="the run id the chief trains (its --run-name)")
    parser.add_argument("--wait", type=float, default=3600.0, help="seconds to wait for the chief's job (default: 3600)")
    args = parser.parse_args(argv)
    from tapeline.training.worker import work

    try:
        trained = work(args.storage, args.run_name, args.wait)
    except TapelineError as error:
        return _failed(prog, 1, error)
    print(f"trained {trained.steps} steps of run {trained.run_id} ({trained.role})")
    return 0


def gc(argv: list[str], prog: str) -> int:
    parser = _Parser(prog=prog, description=COMMANDS["gc"] + "; never the champion, its lineage, or a run being written")
    parser.add_argument("storage", nargs="?", help=f"the storage root (default ${STORAGE_ENV} or {DEFAULT_STORAGE})")
    for p in retention_parameters():
        default = f" (default: {p.default})" if p.default is not None else ""
        parser.add_argument(p.flag, dest=p.name, type=p.kind, default=p.default, metavar=GC_METAVARS[p.name], help=p.help + default)
    parser.add_argument("--yes", action="store_true", help=typing.get_args(Delete)[1].description)
    args = parser.parse_args(argv)
    from tapeline.registry.retention import collect, kept_lines, plan, removal_line, total_line
    from tapeline.storage.access import existing_root
    from tapeline.storage.root import Storage

    try:
        policy = RetentionPolicy(args.keep_last, args.older_than).validated()
        storage = Storage(existing_root(storage_root(args.storage)))
    except ConfigError as error:
        return _failed(prog, 2, error)
    try:
        planned = plan(storage, policy)
        print(*kept_lines(planned), sep="\n", flush=True)
        if not args.yes:
            print(*(removal_line(removal, "delete") for removal in planned.removals), total_line(planned.removals, dry_run=True), sep="\n")
            return 0
        removed = collect(storage, planned, on_removed=lambda removal: print(removal_line(removal, "deleted"), flush=True))
    except CorruptFileError as error:  # before any deletion: run again, it would stop there again
        return _failed(prog, 1, error)
    except (TapelineError, OSError) as error:  # OSError: an unreachable store, a file it refused to delete
        return _failed(prog, 1, f"{' '.join(str(error).split())}; run it again to finish")
    print(total_line(removed, dry_run=False))
    return 0


def _failed(prog: str, code: int, error: Exception | str) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
