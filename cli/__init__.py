"""The `distill` command line, above the packages it calls (`distill`, `students`, `eval`,
`core`): none of them imports it."""

from cli.main import EXIT_BAD_INPUT, build_parser, main

__all__ = ["EXIT_BAD_INPUT", "build_parser", "main"]
