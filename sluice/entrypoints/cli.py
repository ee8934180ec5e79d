"""`sluice` command line: serve, generate, chat, bench. Each subcommand lives in its own module.

A subcommand module exposes ``add_parser(subparsers)`` (which registers its flags and sets
``func``) so that ``sluice --help`` lists everything without importing torch.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="LLM inference and serving engine")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(_SUBCOMMANDS) + "}")
    for name, module_name in _SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("sluice"):
                continue  # subcommand not available in this build
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
