"""The `distill` command line: one subcommand per job, bad input -> one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from core.errors import UserInputError
from core.host_allocator import keep_freed_memory

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    from cli.commands import (
        cache,
        compare,
        controlnet_init,
        evaluate,
        export,
        recipes,
        run,
        student,
    )

    parser = argparse.ArgumentParser(
        prog="distill", description="Distill a Stable Diffusion teacher into a compact student."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in (student, recipes, run, cache, evaluate, export, compare, controlnet_init):
        command.add_parser(subparsers)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line as a namespace. Overrides may follow an option: argparse alone refuses
    `distill run RECIPE --overwrite key=value` (a positional list ends at the first option), so
    the leftover `key=value` words join the command's overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = [word for word in extra if "=" in word and not word.startswith("-")]
        if not hasattr(args, "overrides") or len(overrides) < len(extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    keep_freed_memory()  # every step reuses the last one's buffers (core.host_allocator)
    try:
        return args.run(args)
    except UserInputError as error:
        print(f"distill {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
