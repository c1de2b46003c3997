"""CLI subcommands. Each module defines `register(subparsers)`; `experiments.cli` discovers them.

A subcommand is a thin layer over a library function that tests call directly: `register` adds an
argparse subparser and sets `func=` to a callable taking the parsed args and returning an exit code.
"""
