"""`sluice` command line: serve, generate, chat, bench. Each subcommand lives in its own module.

A subcommand module exposes ``add_parser(subparsers)`` (which registers its flags and sets ``func``). A command
line that names a subcommand imports that module alone (the server's modules add ~2 s to ``sluice generate``);
``sluice`` or ``sluice --help`` imports them all to list them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module providing add_parser(subparsers)
_SUBCOMMANDS = {
    "serve": "sluice.entrypoints.openai.api_server",
    "generate": "sluice.entrypoints.generate",
    "chat": "sluice.entrypoints.chat",
    "bench": "sluice.bench.cli",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with only the subcommand ``argv`` names (its first argument) when it names one."""
    parser = argparse.ArgumentParser(prog="sluice", description="LLM inference and serving engine")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(_SUBCOMMANDS) + "}")
    wanted = argv[0] if argv and argv[0] in _SUBCOMMANDS else None
    for name, module_name in _SUBCOMMANDS.items():
        if wanted is not None and name != wanted:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("sluice"):
                continue  # subcommand not available in this build
            _add_unavailable(subparsers, name, e.name)
            continue
        module.add_parser(subparsers)
    return parser


def _add_unavailable(subparsers: argparse._SubParsersAction, name: str, missing: str | None) -> None:
    """A subcommand whose dependencies are missing still shows up, and says what to install."""
    def fail(_args: argparse.Namespace) -> int:
        print(f"sluice {name}: needs the Python package {missing!r}, which is not installed "
              f"(pip install {missing})", file=sys.stderr)
        return 1
    parser = subparsers.add_parser(name, help=f"(unavailable: {missing} is not installed)")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=fail)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # User errors get one line, not a traceback.
        print(f"sluice: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
