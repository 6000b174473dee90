"""The `scdca` command line: simulate, benchmark, report, export, pretrain, train, predict,
screen, embed, novelty, annotate, pbmc.

One module per command group (`data`, `bench`, `models`, `annotate`); `options` builds flags
from the settings dataclasses and gives every command the same `--config FILE`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from scdca.cli import annotate, bench, data, models
from scdca.errors import GridError, LeakageError, ScdcaInputError

GROUPS = (data, bench, models, annotate)


class Parser(argparse.ArgumentParser):
    """The `scdca` parser, which also knows its sub-commands (`Command`s, for `--config`)."""

    commands: dict[str, Any]


def build_parser() -> Parser:
    parser = Parser(prog="scdca", description="Drug perturbation prediction with scDCA.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub: Any = parser.add_subparsers(dest="command", required=True)
    sub.commands = parser.commands = {}  # name -> Command, filled as each group adds its commands
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def _config_path(argv: list[str]) -> str | None:
    if "--config" not in argv:
        return None
    i = argv.index("--config") + 1
    if i >= len(argv):
        raise ScdcaInputError("config: --config needs a file (a YAML or JSON mapping of option names to values)")
    return argv[i]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        path = _config_path(argv)
        if path is not None and command in parser.commands:
            parser.commands[command].apply_config(path)
    except ScdcaInputError as err:
        print(f"scdca {command}: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        args.func(args)
    except (ScdcaInputError, LeakageError) as err:
        print(f"scdca {args.command}: error: {err}", file=sys.stderr)
        return 2
    except GridError as err:
        print(f"scdca {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
