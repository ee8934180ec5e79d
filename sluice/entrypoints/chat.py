"""`sluice chat`: a multi-turn chat in the terminal, through the model's chat template.

On a TTY it prompts for each turn; with stdin piped, each line is one user turn.
"""
from __future__ import annotations

import argparse
import sys

from sluice.config import EngineArgs
from sluice.entrypoints.utils import add_sampling_args, build_engine, sampling_params_from_args, stream_completion


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("chat", help="chat with the model in the terminal",
                                   description="Multi-turn chat; one line per user turn when stdin is piped.")
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(parser, default_max_tokens=256)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=run)
    return parser


def _turns(interactive: bool):
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        line = line.strip()
        if line in ("/exit", "/quit"):
            return
        if line:
            yield line


def run(args: argparse.Namespace) -> int:
    engine = build_engine(args)
    params = sampling_params_from_args(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; /exit or Ctrl-D quits.", file=sys.stderr)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    for user_text in _turns(interactive):
        messages.append({"role": "user", "content": user_text})
        prompt_ids = engine.apply_chat_template(messages, add_generation_prompt=True)
        reply = stream_completion(engine, {"prompt_token_ids": prompt_ids}, params, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})
    return 0
