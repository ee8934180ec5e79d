"""Pieces shared by the terminal commands: sampling flags, engine start-up, streaming to a file."""
from __future__ import annotations

import argparse
import itertools
import logging
from typing import TextIO

from sluice.config import EngineArgs
from sluice.sampling_params import RequestOutputKind, SamplingParams

_request_ids = itertools.count()


def add_sampling_args(parser: argparse.ArgumentParser, default_max_tokens: int = 128) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=default_max_tokens,
                       help="most tokens to generate (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    group.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    group.add_argument("--top-k", type=int, default=-1, help="-1 = off (default: %(default)s)")
    group.add_argument("--min-p", type=float, default=0.0, help="(default: %(default)s)")
    group.add_argument("--sampling-seed", type=int, default=None, help="seed of this request's sampling")
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.sampling_seed, stop=args.stop,
                          ignore_eos=args.ignore_eos, output_kind=RequestOutputKind.DELTA)


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_device_available(device: str) -> None:
    """A one-line ValueError for --device cuda where torch has no CUDA (instead of torch's traceback)."""
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            built = "a CPU-only build of torch" if torch.version.cuda is None else "no usable CUDA device"
            raise ValueError(f"--device cuda, but this machine has {built}; use --device cpu (or auto)")


def build_engine(args: argparse.Namespace):
    from sluice.engine.llm_engine import LLMEngine

    configure_logging()
    check_device_available(args.device)
    return LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))


def stream_completion(engine, prompt, params: SamplingParams, out: TextIO) -> str:
    """Runs one request to the end, writing text deltas to ``out`` as they arrive; returns the text."""
    request_id = f"cli-{next(_request_ids)}"
    engine.add_request(request_id, prompt, params)
    pieces: list[str] = []
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                delta = output.outputs[0].text
                if delta:
                    out.write(delta)
                    out.flush()
                    pieces.append(delta)
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        raise
    return "".join(pieces)
