"""The `ept-hw` command line: one entry point, subcommands discovered in `experiments.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from ept_hw.config import ConfigError

from . import commands


class HelpFormatter(argparse.HelpFormatter):
    """Help with every option's default (options whose default is "unset": none shown, their
    help says where the value comes from)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == [] or default is argparse.SUPPRESS
                or "%(default)" in text or "default" in text or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """`ept-hw`'s parsers: defaults in every help (`HelpFormatter`)."""

    def __init__(self, *args, **kwargs) -> None:
        given = kwargs.get("formatter_class")
        if given is None or issubclass(given, HelpFormatter):
            kwargs["formatter_class"] = HelpFormatter
        else:  # a command's own formatter (e.g. raw description) keeps its layout and gains the defaults
            kwargs["formatter_class"] = type(f"Defaults{given.__name__}", (HelpFormatter, given), {})
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ept-hw",
        description="Train an equilibrium transformer by Equilibrium Propagation on simulated analog "
        "crossbars, beside an exact digital twin.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def _version() -> str:
    from trainer.rundir import package_version

    return package_version()


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 1 the command's own failure verdict, 2 bad input (a
    one-line message naming the file or key, no traceback), 3 a run diverged, 130 interrupted
    (Ctrl-C), 141 the reader of our output went away (`| head`)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\nept-hw: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader closed the pipe: point stdout at /dev/null so the interpreter's final flush is quiet
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from trainer.rundir import RunLockedError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, RunLockedError) as exc:
        print(f"ept-hw {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError) as exc:
        print(f"ept-hw {args.command}: error: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
