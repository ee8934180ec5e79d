"""Structured outputs' host costs with the default model's tokenizer (49,152 tokens): the compile of each W7
schema cold and from the manager's cache, the token bitmask fill of one step's constrained rows, and the host work
of decoding W7 on dummy weights (each row takes the best allowed token of random logits: fill, then accept).

    python benchmarks/structured_outputs_bench.py [--rows 256] [--backend xgrammar|guidance]
    python benchmarks/structured_outputs_bench.py --tokenizer small --vocab-size 128256   # W7 on the device (L8)

Cold: a fresh StructuredOutputManager per schema after the tokenizer and backend are built (their one-off cost is
reported apart). Cached: the same spec again (a dict hit returning the finished future). Fill: ``--rows`` matchers,
one per row, spread over the six schemas, each a few tokens into its JSON, filled as the engine core fills a step.
Fill ways (``--fill-threads``): the same rows filled from Python row by row on one thread and on several Python
threads, and by the grammar library's batch call on one thread and on several. Decode: ``--decode-steps`` steps of
all rows, a finished row starting over on its schema; per step, the fill (the library's batch call on one thread;
the engine adds threads as the measured cost earns them) and the matchers' accepts, in turn as the engine runs them.

``--tokenizer small`` takes the benchmarks' 320-token tokenizer (model_dir.py's; W7 on the device runs with it) and
``--vocab-size`` the model's vocabulary: the grammars decide over the tokenizer's ids only, whatever the model pads.
``--grammar-vocab-size`` sets the grammars' width instead (the model's, as sluice gave it before: the ids past the
tokenizer then count as special tokens that every fill and accept checks).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sluice.bench.datasets import STRUCTURED_SCHEMAS
from sluice.models.default_model import default_model_path
from sluice.sampling_params import StructuredOutputsParams
from sluice.structured_output.manager import StructuredOutputManager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--backend", default="xgrammar", choices=("xgrammar", "guidance"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokenizer", default="default", choices=("default", "small"),
                        help="the default model's tokenizer, or the benchmarks' 320-token one")
    parser.add_argument("--vocab-size", type=int, default=49152, help="the model's vocabulary (logits width)")
    parser.add_argument("--decode-steps", type=int, default=60)
    parser.add_argument("--fill-threads", type=int, default=2,
                        help="threads for the fill comparison: Python threads vs the grammar library's batch call")
    parser.add_argument("--grammar-vocab-size", type=int, default=None,
                        help="the grammars' width (default: the tokenizer's ids, as the engine takes them)")
    args = parser.parse_args()
    model = default_model_path()
    if args.tokenizer == "small":
        from tests.tiny_models import build_tokenizer
        model = tempfile.mkdtemp(prefix="sluice-tok-")
        build_tokenizer().save_pretrained(model)
    model_config = SimpleNamespace(model=model, tokenizer=None, skip_tokenizer_init=False,
                                   vocab_size=args.vocab_size)
    manager = StructuredOutputManager(model_config, args.backend, max_workers=1)
    if args.grammar_vocab_size is not None:
        manager._tokenizer = manager._load_tokenizer()
        manager.grammar_vocab_size = args.grammar_vocab_size
    start = time.perf_counter()
    backend = manager._backend(args.backend)
    print(f"tokenizer + {args.backend} backend (once per engine core): {time.perf_counter() - start:.2f} s; "
          f"grammar vocabulary {manager.grammar_vocab_size} of the model's {args.vocab_size}")
    compiled = []
    for i, schema in enumerate(STRUCTURED_SCHEMAS):
        params = StructuredOutputsParams(json=schema, backend=args.backend)
        fresh = StructuredOutputManager(model_config, args.backend, max_workers=1)
        fresh._backends, fresh._tokenizer = dict(manager._backends), manager._tokenizer
        start = time.perf_counter()
        future = fresh.compile_async(params)
        future.result()
        cold = time.perf_counter() - start
        start = time.perf_counter()
        again = fresh.compile_async(params).result()
        cached = time.perf_counter() - start
        compiled.append(again)
        print(f"schema {i}: cold {cold * 1e3:7.2f} ms   cached {cached * 1e6:6.1f} us")
        fresh.shutdown()
    import torch
    grammars = []
    for row in range(args.rows):
        schema_backend, schema_compiled = compiled[row % len(compiled)]
        grammar = schema_backend.matcher(schema_compiled)
        for token in manager._tokenizer.encode('{"', add_special_tokens=False):
            grammar.accept_token(token)
        grammars.append(grammar)
    from sluice.structured_output.apply import apply_grammar_bitmask
    from sluice.structured_output.manager import GrammarBitmask
    req_ids = [str(i) for i in range(args.rows)]
    step = GrammarBitmask(dict(zip(req_ids, grammars)), manager.grammar_vocab_size)
    times, apply_times = [], []
    logits = torch.randn(args.rows, model_config.vocab_size)
    for _ in range(args.repeats):
        start = time.perf_counter()
        step.fill(req_ids)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        apply_grammar_bitmask(logits, req_ids, step)  # fills again, then applies
        apply_times.append(time.perf_counter() - start - times[-1])
    print(f"bitmask fill, {args.rows} rows: median {statistics.median(times) * 1e3:.2f} ms "
          f"(min {min(times) * 1e3:.2f}); apply to [{args.rows}, {model_config.vocab_size}] CPU logits: "
          f"median {statistics.median(apply_times) * 1e3:.2f} ms")
    compare_fills(step, req_ids, args.fill_threads, args.repeats)
    fill_ms, accept_ms = decode(compiled, step, req_ids, logits, args.decode_steps)
    print(f"decode, {args.rows} rows, {args.decode_steps} steps: fill {fill_ms:.2f} ms and accept {accept_ms:.2f} ms "
          f"per step ({fill_ms / args.rows * 1e3:.1f} and {accept_ms / args.rows * 1e3:.1f} us per row)")
    manager.shutdown()
    print(json.dumps({"backend": args.backend, "rows": args.rows, "tokenizer": args.tokenizer,
                      "vocab_size": args.vocab_size, "grammar_vocab_size": manager.grammar_vocab_size,
                      "decode_fill_ms_per_step": fill_ms, "decode_accept_ms_per_step": accept_ms}))


def compare_fills(step, req_ids: list[str], num_threads: int, repeats: int) -> None:
    """One step's rows filled four ways (medians): row by row from Python on one thread and split over
    ``num_threads`` Python threads (the engine before its batch fill), and the library's batch call
    (backends.fill_rows, what the engine runs) on one thread and on ``num_threads``."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from sluice.structured_output.backends import fill_rows
    grammars = [step.grammars[r] for r in req_ids]
    rows = list(range(len(grammars)))
    bitmask = torch.full((len(rows), (step.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def python_rows(part: range) -> None:
        for row in part:
            grammars[row].fill_bitmask(bitmask, row)

    with ThreadPoolExecutor(num_threads) as pool:
        ways = {
            "Python loop, 1 thread": lambda: python_rows(range(len(rows))),
            f"Python loop, {num_threads} Python threads": lambda: [
                f.result() for f in [pool.submit(python_rows, range(k, len(rows), num_threads))
                                     for k in range(num_threads)]],
            "library batch call, 1 thread": lambda: fill_rows(bitmask, grammars, rows, 1),
            f"library batch call, {num_threads} threads": lambda: fill_rows(bitmask, grammars, rows, num_threads),
        }
        for name, fill in ways.items():
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fill()
                times.append(time.perf_counter() - start)
            print(f"fill {len(rows)} rows, {name}: median {statistics.median(times) * 1e3:.3f} ms")


def decode(compiled: list, step, req_ids: list[str], logits, num_steps: int) -> tuple[float, float]:
    """Median fill and accept milliseconds per step, every row taking its best allowed token each step."""
    import torch
    from sluice.structured_output.apply import apply_grammar_bitmask
    generator = torch.Generator().manual_seed(0)
    fills, accepts = [], []
    for _ in range(num_steps):
        for i, req_id in enumerate(req_ids):
            if step.grammars[req_id].is_terminated():
                backend, grammar = compiled[i % len(compiled)]
                step.grammars[req_id] = backend.matcher(grammar)
        start = time.perf_counter()
        step.fill(req_ids)
        fills.append(time.perf_counter() - start)
        logits.normal_(generator=generator)
        apply_grammar_bitmask(logits, req_ids, step)
        tokens = logits.argmax(-1).tolist()
        start = time.perf_counter()
        for req_id, token in zip(req_ids, tokens):
            step.grammars[req_id].accept_token(token)
        accepts.append(time.perf_counter() - start)
    return statistics.median(fills) * 1e3, statistics.median(accepts) * 1e3


if __name__ == "__main__":
    main()
