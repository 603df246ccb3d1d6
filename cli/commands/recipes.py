"""`distill recipes`: the builtin recipes, runnable by name from any directory."""

from __future__ import annotations

import argparse
import json
import textwrap


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recipes",
        help="list the builtin recipes (run one by name: distill run small_sd_v0)",
        description="List the recipes shipped with sd-distill. Any command that takes a recipe "
        "file also takes one of these names.",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object, name -> details")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from distill.builtin_recipes import builtin_recipes, describe

    recipes = {
        name: describe(path) | {"path": str(path)} for name, path in builtin_recipes().items()
    }
    if args.json:
        print(json.dumps(recipes, indent=1))
        return 0
    width = max(len(name) for name in recipes)
    for name, details in recipes.items():
        stages = ", ".join(details["stages"]) or details["kind"]
        text = textwrap.shorten(f"[{stages}] {details['summary']}", 110 - width)
        print(f"{name:<{width}}  {text}")
    return 0
