"""One module per `distill` subcommand: each has `add_parser(subparsers)` and `run(args) -> int`."""
