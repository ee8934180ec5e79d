"""`sluice generate "prompt"`: print a raw completion, streaming tokens to the terminal as they arrive."""
from __future__ import annotations

import argparse
import sys

from sluice.config import EngineArgs
from sluice.entrypoints.utils import add_sampling_args, build_engine, sampling_params_from_args, stream_completion


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("generate", help="complete a prompt with the model (raw, no chat template)",
                                   description="Complete a prompt and stream the text to stdout.")
    parser.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted")
    add_sampling_args(parser)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ValueError("no prompt given (pass it as an argument or on stdin)")
    engine = build_engine(args)
    stream_completion(engine, prompt, sampling_params_from_args(args), sys.stdout)
    sys.stdout.write("\n")
    return 0
