"""`clip-data` / `python -m data_tools`: one subcommand per source, plus verify.

Each module in SUBCOMMAND_MODULES registers its own subparser(s) through
`add_parser(subparsers)` and sets `func(args) -> exit status`. Expected bad input raises
DataError, printed here as one line (exit status 2), never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from data_tools import __version__
from data_tools.errors import DataError

SUBCOMMAND_MODULES = ("synthetic", "coco", "karpathy", "local", "laion", "verify", "embed")


def _add_unavailable(subparsers, name: str, why: str) -> None:
    """Keep the subcommand visible while its module is missing, and say so when it is used."""
    parser = subparsers.add_parser(name, help=f"(unavailable: {why})", add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)

    def fail(args):
        raise DataError(f"the {name} subcommand is unavailable: {why}")

    parser.set_defaults(func=fail)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-data",
        description="Turn image-text sources into verified WebDataset shard sets "
                    "(docs/data.md).")
    parser.add_argument("--version", action="version", version=f"clip-data {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"data_tools.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"data_tools.{name}":
                raise  # a missing dependency of an existing module is a real error
            _add_unavailable(subparsers, name, f"data_tools/{name}.py is not installed")
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except DataError as e:
        message = str(e).encode("utf-8", "backslashreplace").decode("utf-8")
        print(f"clip-data {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clip-data {args.command}: interrupted; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
