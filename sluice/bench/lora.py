"""LoRA in the benchmarks: dummy PEFT adapters for a model shape, and the per-adapter request mix of W5.

    sluice bench make-loras --model L8 --num-loras 8 --lora-rank 16 --out DIR    # prints --lora-modules ...

``bench throughput --num-loras 8 --lora-rank 16`` writes such adapters to a temporary folder, spreads the
requests evenly over them (request i uses adapter i mod N) and times the engine without LoRA and with it on
the same requests. ``bench serve --lora-mix noisy:8 a1:1 ...`` sends each request to one adapter (the
``model`` field), drawn with probability proportional to its weight: arrivals stay Poisson overall and per
adapter (a Poisson stream split at random is Poisson streams), so ``noisy:8`` arrives at 8x the others' rate.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(hf_config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each decoder-layer projection of a Llama-like config."""
    hidden = hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
    q = hf_config.num_attention_heads * head_dim
    kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    inter = hf_config.intermediate_size
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv * head_dim), "v_proj": (hidden, kv * head_dim),
            "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


def write_dummy_adapters(hf_config: Any, folder: str, num_loras: int, rank: int, seed: int = 0,
                         dtype: str = "bfloat16") -> list[str]:
    """Writes ``num_loras`` PEFT LoRA checkpoints (random A and B on all seven projections of every layer)
    into ``folder``/lora-<i>; returns their paths. Values are small, so outputs stay finite."""
    import torch
    from safetensors.torch import save_file

    shapes = projection_shapes(hf_config)
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for index in range(num_loras):
        path = os.path.join(folder, f"lora-{index}")
        os.makedirs(path, exist_ok=True)
        tensors = {}
        for layer in range(hf_config.num_hidden_layers):
            for name, (in_size, out_size) in shapes.items():
                group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{group}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_size, generator=generator)
                                                      * in_size ** -0.5).to(torch_dtype)
                tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_size, rank, generator=generator)
                                                      * 0.01).to(torch_dtype)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
                  "target_modules": list(PROJECTIONS), "task_type": "CAUSAL_LM"}
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(config, f)
        paths.append(path)
    return paths


def spread_lora_requests(num_requests: int, paths: Sequence[str]) -> list[Any]:
    """Request i uses adapter i mod N (ids 1..N)."""
    from sluice.lora.request import LoRARequest

    adapters = [LoRARequest(f"lora-{i}", i + 1, path) for i, path in enumerate(paths)]
    return [adapters[i % len(adapters)] for i in range(num_requests)]


# ---- bench serve: the per-adapter mix -----------------------------------------------------------------------
def parse_lora_mix(items: Sequence[str] | None) -> dict[str, float]:
    """["noisy:8", "a1:1"] -> {"noisy": 8.0, "a1": 1.0}; a bare name weighs 1."""
    mix: dict[str, float] = {}
    for item in items or []:
        name, _, weight = item.rpartition(":") if ":" in item else (item, "", "1")
        try:
            mix[name] = float(weight)
        except ValueError:
            raise ValueError(f"lora_mix: {item!r} is not NAME:WEIGHT") from None
        if not name or mix[name] <= 0:
            raise ValueError(f"lora_mix: {item!r} needs a name and a positive weight")
    return mix


def assign_adapters(num_requests: int, mix: dict[str, float], seed: int) -> list[str]:
    """Each request's adapter, drawn independently with probability weight / total (seeded)."""
    names = list(mix)
    weights = np.array([mix[n] for n in names], dtype=np.float64)
    picks = np.random.default_rng(seed + 1).choice(len(names), size=num_requests, p=weights / weights.sum())
    return [names[i] for i in picks]


def per_adapter_metrics(adapters: Sequence[str], results: Sequence[Any], mix: dict[str, float], duration_s: float,
                        slos: dict[str, float]) -> dict[str, Any]:
    """Metrics of each adapter's requests, and of the light ones together (every adapter but the heaviest,
    when weights differ): their TTFT percentiles are what fair scheduling protects."""
    from sluice.bench.serve_client import calculate_metrics

    by_name: dict[str, list[Any]] = {name: [] for name in mix}
    for name, result in zip(adapters, results):
        by_name[name].append(result)
    report: dict[str, Any] = {"per_adapter": {name: {"weight": mix[name], **calculate_metrics(rs, duration_s, slos)
                                                     .to_dict()} for name, rs in by_name.items() if rs}}
    heaviest = max(mix.values())
    light = [r for name, rs in by_name.items() if mix[name] < heaviest for r in rs]
    if light:
        report["light_adapters"] = {"adapters": sorted(n for n in mix if mix[n] < heaviest),
                                    **calculate_metrics(light, duration_s, slos).to_dict()}
    return report


def format_lora_lines(engine: dict[str, Any]) -> list[str]:
    lines = [f"{' Per adapter (TTFT ms: p50 / p99) ':-^56}"]
    for name, m in engine.get("per_adapter", {}).items():
        label = f"{name} (weight {m['weight']:g}, {m['completed']} req):"
        lines.append(f"{label:<40}{m['ttft_ms_p50']:.1f} / {m['ttft_ms_p99']:.1f}")
    if "light_adapters" in engine:
        light = engine["light_adapters"]
        lines.append(f"{'light adapters together:':<40}{light['ttft_ms_p50']:.1f} / {light['ttft_ms_p99']:.1f}")
    return lines


# ---- bench make-loras -----------------------------------------------------------------------------------------
def add_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = bench_subparsers.add_parser(
        "make-loras", help="write dummy PEFT LoRA adapters for a model shape (for bench serve --lora-mix)",
        description="Random rank-R adapters on all seven projections; prints the server's --lora-modules.")
    parser.add_argument("--model", required=True, help="L8, G9 or a model folder (its config.json)")
    parser.add_argument("--num-loras", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--out", required=True, help="folder for the adapters (lora-0, lora-1, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_make_loras)
    return parser


def run_make_loras(args: argparse.Namespace) -> int:
    import tempfile

    from transformers import AutoConfig

    from sluice.bench.shapes import SHAPE_WRITERS

    with tempfile.TemporaryDirectory() as scratch:
        writer = SHAPE_WRITERS.get(args.model)
        hf_config = AutoConfig.from_pretrained(writer(scratch) if writer else args.model)
    paths = write_dummy_adapters(hf_config, args.out, args.num_loras, args.lora_rank, args.seed)
    print("--lora-modules " + " ".join(f"lora-{i}={path}" for i, path in enumerate(paths)))
    return 0
