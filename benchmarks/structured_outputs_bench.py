"""Structured outputs' host costs with the default model's tokenizer (49,152 tokens): the compile of each W7
schema cold and from the manager's cache, and the token bitmask fill of one step's constrained rows.

    python benchmarks/structured_outputs_bench.py [--rows 256] [--backend xgrammar|guidance]

Cold: a fresh StructuredOutputManager per schema after the tokenizer and backend are built (their one-off cost is
reported apart). Cached: the same spec again (a dict hit returning the finished future). Fill: ``--rows`` matchers,
one per row, spread over the six schemas, each a few tokens into its JSON, filled as the engine core fills a step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

from sluice.bench.datasets import STRUCTURED_SCHEMAS
from sluice.models.default_model import default_model_path
from sluice.sampling_params import StructuredOutputsParams
from sluice.structured_output.manager import StructuredOutputManager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--backend", default="xgrammar", choices=("xgrammar", "guidance"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    model_config = SimpleNamespace(model=default_model_path(), tokenizer=None, skip_tokenizer_init=False,
                                   vocab_size=49152)
    manager = StructuredOutputManager(model_config, args.backend, max_workers=1)
    start = time.perf_counter()
    backend = manager._backend(args.backend)
    print(f"tokenizer + {args.backend} backend (once per engine core): {time.perf_counter() - start:.2f} s")
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
    step = GrammarBitmask(dict(zip(req_ids, grammars)), model_config.vocab_size)
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
    manager.shutdown()
    print(json.dumps({"backend": args.backend, "rows": args.rows}))


if __name__ == "__main__":
    main()
