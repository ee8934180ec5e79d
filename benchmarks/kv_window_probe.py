"""KV blocks per request of sliding-window models while their contexts grow (issue 21's device target).

    python benchmarks/kv_window_probe.py --model G9 --out g9_kv.json [--num-reqs 8] [--prompt-len 3000]
                                         [--output-len 2000]
    python benchmarks/kv_window_probe.py --model M7 --out m7_kv.json
    python benchmarks/kv_window_probe.py --model G9 --tiny --out g9_tiny.json   # CPU smoke: a tiny Gemma 2

G9 is the Gemma-2-9B shape (sliding-window layers alternate with global ones: one block table per layer
group, the windowed group frees blocks behind its window, the global one keeps all), M7 the Mistral-7B-v0.1 shape (every layer windowed at 4096 tokens: blocks
behind the window go back to the pool). Dummy bf16 weights, a tiny tokenizer (prompts are token ids).
Steps until every request finishes and records, per request, the most blocks it held and its final
context length; the JSON also has the window, the block size and the bound (window / block_size + 1
plus a prompt chunk's blocks) that windowed models must stay under. With layer groups a block is one group
deep: ``max_layer_blocks_per_request`` (blocks x layers each) compares with ``layer_blocks_for_full_context``
(every layer keeping every block, as before layer groups).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sluice import LLM, SamplingParams  # noqa: E402
from sluice.bench.cli import write_g9_config  # noqa: E402
from sluice.config import windowed_request_blocks  # noqa: E402


def write_m7_config(folder: str) -> str:
    from transformers import MistralConfig

    from sluice.bench.cli import _write_config

    config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                           sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                           architectures=["MistralForCausalLM"], dtype="bfloat16")
    return _write_config(config, os.path.join(folder, "M7"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["G9", "M7"], default="G9")
    parser.add_argument("--num-reqs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=3000)
    parser.add_argument("--output-len", type=int, default=2000)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model of the same layer pattern on the CPU (window 32, 4 layers), for a smoke run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from tests.tiny_models import build_tokenizer, save_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:
            layer_types = (["sliding_attention", "full_attention"] * 2 if args.model == "G9"
                           else ["sliding_attention"] * 4)
            folder = str(save_tiny_model(os.path.join(scratch, "tiny"), "gemma2", num_hidden_layers=4,
                                         layer_types=layer_types, sliding_window=32, max_position_embeddings=4096))
            device, dtype, memory = "cpu", "float32", dict(num_kv_blocks=4096, block_size=16)
        else:
            folder = (write_g9_config if args.model == "G9" else write_m7_config)(scratch)
            build_tokenizer().save_pretrained(folder)
            device, dtype, memory = "cuda", "bfloat16", dict(gpu_memory_utilization=0.9)
        llm = LLM(model=folder, tokenizer=folder, load_format="dummy", dtype=dtype, device=device,
                  max_model_len=args.prompt_len + args.output_len + 16, max_num_seqs=args.num_reqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, **memory)
        result = probe(llm, args)
    result.update(model=args.model)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def probe(llm: LLM, args: argparse.Namespace) -> dict:
    engine = llm.llm_engine
    core = engine.core
    manager = core.scheduler.kv_cache_manager
    vocab = core.config.model.vocab_size
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    for i in range(args.num_reqs):
        engine.add_request(f"r{i}", {"prompt_token_ids": rng.integers(0, vocab, args.prompt_len).tolist()}, params)
    groups = getattr(manager, "groups", None)  # layer groups (windowed and global layers mixed)
    num_layers = core.config.model.num_layers
    if groups is not None:
        def live(req_id: str) -> int:
            return sum(manager.num_live_blocks(req_id))
        layers_per_block = len(groups[0].layers)
    else:
        live = getattr(manager, "num_live_blocks", lambda req_id: len(manager.req_to_blocks.get(req_id, ())))
        layers_per_block = num_layers
    max_blocks: dict[str, int] = {}
    context: dict[str, int] = {}
    start, steps, output_tokens = time.perf_counter(), 0, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            output_tokens += 0 if not output.finished else len(output.outputs[0].token_ids)
        steps += 1
        for request in core.scheduler.running:
            max_blocks[request.request_id] = max(max_blocks.get(request.request_id, 0), live(request.request_id))
            context[request.request_id] = request.num_tokens
    elapsed = time.perf_counter() - start
    block_size = core.config.cache.block_size
    window = core.config.cache.sliding_window
    full_context_blocks = -(-(args.prompt_len + args.output_len) // block_size)
    layer_window = getattr(core.config.model.hf_config, "sliding_window", None)
    bound = None if window is None else windowed_request_blocks(window, args.max_num_batched_tokens, block_size)
    if groups is not None:  # each windowed group's bound (the global groups hold every block)
        bound = windowed_request_blocks(layer_window, args.max_num_batched_tokens, block_size)
    return dict(kv_sliding_window=window, layer_sliding_window=layer_window, block_size=block_size,
                num_kv_blocks=core.config.cache.num_blocks, windowed_bound_blocks=bound,
                max_blocks_per_request=max_blocks, final_context_len=context,
                blocks_for_full_context=full_context_blocks,
                kv_layer_groups=None if groups is None else [[g.sliding_window, list(g.layers)] for g in groups],
                layers_per_block=layers_per_block,
                max_layer_blocks_per_request={r: n * layers_per_block for r, n in max_blocks.items()},
                layer_blocks_for_full_context=full_context_blocks * num_layers,
                steps=steps, seconds=round(elapsed, 2), output_tokens_per_s=round(output_tokens / elapsed, 1))


if __name__ == "__main__":
    main()
