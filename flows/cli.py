"""train-flow: download -> preprocess -> train (gpu) -> export gradients -> evaluate -> promote.

The command line (`python flows/train.py`, `tapeline-train`). It reads and checks
the flags with the run parameters alone, and imports the flow, and so TensorFlow
and Prefect, only once they are good: `--help` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import typing

from tasks.config import ConfigError, RunConfig, parameter_fields

PROG = "flows/train.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")  # one line, no usage dump


def _flag_type(name: str):
    hint = typing.get_type_hints(RunConfig)[name]
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def parse_args(argv: list[str] | None = None) -> dict:
    """The flow's parameters from the flags; exits 2 with one line when they are not valid."""
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    for f in parameter_fields():
        flag, kind = "--" + f.name.replace("_", "-"), _flag_type(f.name)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
            continue
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=f.default,
            choices=f.metadata.get("choices"),
            help=f.metadata["help"] + (f" (default: {f.default})" if f.default is not None else ""),
        )
    args = vars(parser.parse_args(argv))
    try:
        RunConfig(**args).validated()
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return args


def main(argv: list[str] | None = None) -> int:
    parameters = parse_args(argv)
    from flows import train  # seconds of imports: only once the flags are known to be good

    return train.main(parameters)
