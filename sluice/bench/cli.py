"""`sluice bench ...`: benchmark subcommands. This file owns the `bench` parser and `bench throughput`.

    sluice bench throughput --workload W1 [--num-prompts N] [--peers hf,hf-cb] [--peer-num-prompts M]
                            [--model PATH|L8|G9|Q30A3] [--quantization Q [--compare]]
                            [--num-loras 8 --lora-rank 16] [engine flags...]
                            [--output-json FILE]

`bench throughput` resolves the model (``L8`` is the Llama-3.1-8B shape of docs/benchmarks.md, ``G9`` the
Gemma-2-9B shape, ``Q30A3`` the Qwen3-30B-A3B mixture-of-experts shape; each is written as a config-only folder
and loaded with dummy weights), builds the workload's requests, times the engine on them
(W4: prefix caching on and off), then each peer on the first ``--peer-num-prompts`` of the same requests, and
reports tokens per second, ratios (engine over peer, output tokens per second: fair across subsets) and the
roofline fraction. ``--compare`` (with ``--quantization``) also times the same flags without quantization on the
same requests and reports quantized over unquantized output tokens per second; on a workload with structured
requests (W7, ``--structured-fraction``) and no quantization it times the same requests unconstrained twice:
with their own output lengths (``structured_over_unconstrained``, output tokens per second), and with each
request's output length set to what it generated constrained (``structured_over_matched``: the same tokens, so
the grammar's cost alone; constrained requests stop when their JSON is complete). With ``--num-loras N`` the
engine runs twice on the same requests: without LoRA (``engine_base``), then with N dummy adapters of
``--lora-rank`` on all seven projections, requests spread evenly over them (``engine``; ``lora_over_base`` is its
output tokens per second over the base run's). Other benchmark subcommands (``serve``) live in their own modules
of this package and register themselves through their ``add_parser(bench_subparsers)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import subprocess
import tempfile
from typing import Any

from sluice.bench.report import DEFAULT_RESULTS_DIR, default_output_path, write_report
from sluice.config import EngineArgs

from sluice.bench.shapes import (  # noqa: F401 - the shapes' writers, re-exported for scripts
    G9_NAME, L8_NAME, Q30A3_NAME, SHAPE_WRITERS, write_g9_config, write_l8_config, write_q30a3_config,
)
_OTHER_BENCHMARKS = ("sluice.bench.serve", "sluice.bench.lora",
                     "sluice.bench.latency")  # optional modules exposing add_parser(bench_subparsers)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    bench = subparsers.add_parser("bench", help="benchmark the engine against its peers",
                                  description="Benchmarks defined in docs/benchmarks.md.")
    bench_subparsers = bench.add_subparsers(dest="bench_command", metavar="{throughput,...}")
    add_throughput_parser(bench_subparsers)
    for module_name in _OTHER_BENCHMARKS:
        import importlib
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue  # not written yet, or its client library is not installed here
        module.add_parser(bench_subparsers)
    bench.set_defaults(func=lambda args: bench.print_help() or 2)
    return bench


def add_throughput_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from sluice.bench.datasets import WORKLOADS
    from sluice.bench.roofline import H100_HBM_BYTES_PER_S, H100_PEAK_FLOPS

    parser = bench_subparsers.add_parser(
        "throughput", help="offline throughput on workloads W1-W4, with Hugging Face peers in the same run",
        description="Offline throughput (docs/benchmarks.md). --model L8 (G9, Q30A3) builds the Llama-3.1-8B "
                    "(Gemma-2-9B, Qwen3-30B-A3B) shape with dummy weights; --seed seeds both the workload and dummy weights.")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--workload", default="W1", choices=sorted(WORKLOADS),
                       help="; ".join(f"{w.name}: {w.description}" for w in WORKLOADS.values()))
    bench.add_argument("--num-prompts", type=int, default=None, help="requests (default: the workload's count)")
    bench.add_argument("--structured-fraction", type=float, default=None,
                       help="fraction of requests constrained by a JSON schema (structured outputs); default 1.0 "
                            "for W7, else 0")
    bench.add_argument("--length-scale", type=float, default=1.0,
                       help="multiply every nominal prompt/output length (for small models on CPU)")
    bench.add_argument("--peers", default="", help="comma-separated peers on the same requests: hf, hf-cb (in this "
                                                   "process), vllm (in its own; needs --vllm-pythonpath)")
    bench.add_argument("--peer-num-prompts", type=int, default=None,
                       help="run peers on the first N requests only (compare tokens/s); default all")
    bench.add_argument("--hf-batch-size", type=int, default=64, help="static batch size of the hf peer")
    bench.add_argument("--vllm-pythonpath", default=None,
                       help="the folder vLLM is installed in, for --peers vllm (default: $SLUICE_VLLM_PYTHONPATH)")
    bench.add_argument("--num-warmup-prompts", type=int, default=4, help="untimed short requests before timing")
    bench.add_argument("--disable-detokenize", action="store_true", help="do not detokenize outputs")
    bench.add_argument("--hbm-bandwidth", type=float, default=H100_HBM_BYTES_PER_S,
                       help="bytes/s for the roofline (default: measured H100 copy bandwidth)")
    bench.add_argument("--peak-flops", type=float, default=H100_PEAK_FLOPS,
                       help="FLOP/s for the roofline (default: measured H100 bf16 matmul)")
    bench.add_argument("--output-json", default=None,
                       help=f"result file (default: {DEFAULT_RESULTS_DIR}/throughput_<workload>_<model>_<device>_"
                            "<date>.json)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--compare", action="store_true",
                       help="with --quantization: also run the unquantized model (the same flags without "
                            "--quantization) on the same requests, and report quantized over unquantized; with "
                            "structured requests (W7): also run them unconstrained, at their own and at the "
                            "constrained run's output lengths")
    bench.add_argument("--num-loras", type=int, default=0,
                       help="also run with this many dummy LoRA adapters (all seven projections), requests spread "
                            "evenly over them, after a run without LoRA on the same requests")
    bench.add_argument("--lora-rank", type=int, default=16, help="rank of the --num-loras adapters")
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=run_throughput_command)
    return parser


@dataclasses.dataclass(frozen=True, slots=True)
class ResolvedModel:
    name: str  # what the JSON calls it: "L8", "Q30A3", "S135" or the path
    engine_args: EngineArgs


def resolve_model(engine_args: EngineArgs, scratch_dir: str) -> ResolvedModel:
    """Turns ``--model L8`` / ``G9`` / ``Q30A3`` into a config-only folder with dummy weights; names the default model S135."""
    writer = SHAPE_WRITERS.get(engine_args.model)
    if writer is not None:
        name = engine_args.model
        if engine_args.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format: {name} has no checkpoint, only dummy weights "
                             f"(got {engine_args.load_format!r})")
        if engine_args.tokenizer is None:
            raise ValueError(f"tokenizer: {name} is a config-only folder and the engine needs a tokenizer; pass "
                             "--tokenizer (any tokenizer folder or .gguf will do: prompts are token ids; "
                             "add --disable-detokenize if its vocabulary is smaller than the shape's)")
        folder = writer(scratch_dir)
        return ResolvedModel(name, dataclasses.replace(engine_args, model=folder, load_format="dummy"))
    return ResolvedModel("S135" if engine_args.model is None else engine_args.model, engine_args)




def run_throughput_command(args: argparse.Namespace) -> int:
    from sluice.bench.peers import parse_peers

    peers = parse_peers(args.peers)  # fail on a bad name (or a vLLM that is not there) before any model loads
    if "vllm" in peers:
        from sluice.bench.vllm_peer import find_vllm

        find_vllm(args.vllm_pythonpath)
    for name in ("num_prompts", "peer_num_prompts", "hf_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    structured = args.workload == "W7" or bool(getattr(args, "structured_fraction", None))
    if args.compare and args.quantization in (None, "None", "none", "") and not structured:
        raise ValueError("--compare runs the model with and without --quantization, or structured requests (W7, "
                         "--structured-fraction) with and without their constraints: pass one of them")
    if args.compare and getattr(args, "num_loras", 0):
        raise ValueError("--compare and --num-loras each add a baseline run: give one of them")
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as scratch:
        model = resolve_model(EngineArgs.from_cli_args(args), scratch)
        report = run_throughput_benchmark(args, model, peers)
    print(format_table(report))
    write_report(report, args.output_json or default_output_path("throughput", report))
    return 0


def run_throughput_benchmark(args: argparse.Namespace, model: ResolvedModel, peers: list[str]) -> dict[str, Any]:
    """Engine (and for W4 the engine without prefix caching), then peers; returns the JSON report."""
    from sluice.bench.datasets import BenchRequest, generate_workload
    from sluice.bench.peers import PEER_RUNNERS, PeerConfig
    from sluice.bench.throughput import run_sluice
    from sluice.config import create_engine_config

    engine_args = model.engine_args
    model_config = create_engine_config(engine_args).model
    requests = generate_workload(args.workload, model_config.vocab_size, args.num_prompts, engine_args.seed,
                                 model_config.max_model_len, args.length_scale, args.structured_fraction)
    run_kwargs = dict(detokenize=not args.disable_detokenize, num_warmup=args.num_warmup_prompts,
                      use_tqdm=not args.no_progress)
    runs = {}
    if args.workload == "W4":  # docs/benchmarks.md: W4 runs with prefix caching on and off
        timed_args = dataclasses.replace(engine_args, enable_prefix_caching=True)
        runs["engine"] = run_sluice(timed_args, requests, **run_kwargs)
        runs["engine_prefix_caching_off"] = run_sluice(
            dataclasses.replace(engine_args, enable_prefix_caching=False), requests, name="sluice-no-prefix-cache",
            **run_kwargs)
    elif getattr(args, "num_loras", 0):
        runs.update(run_base_and_lora(engine_args, model_config.hf_config, requests, args.num_loras, args.lora_rank,
                                      run_kwargs))
    else:
        timed_args = engine_args
        runs["engine"] = run_sluice(engine_args, requests, **run_kwargs)
    if args.compare and engine_args.quantization:  # the same requests and flags, without quantization
        runs["engine_unquantized"] = run_sluice(dataclasses.replace(timed_args, quantization=None), requests,
                                                name="sluice-unquantized", **run_kwargs)
    elif args.compare:  # the same requests without their constraints: own lengths, then the constrained run's
        if not any(r.json_schema is not None for r in requests):
            raise ValueError("--compare without --quantization needs structured requests (W7, --structured-fraction)")
        plain = [BenchRequest(r.prompt_token_ids, r.output_len) for r in requests]
        runs["engine_unconstrained"] = run_sluice(timed_args, plain, name="sluice-unconstrained", **run_kwargs)
        matched = [BenchRequest(r.prompt_token_ids, max(n, 1)) for r, n in zip(requests, runs["engine"].output_lens)]
        runs["engine_unconstrained_matched"] = run_sluice(timed_args, matched, name="sluice-unconstrained-matched",
                                                          **run_kwargs)
    peer_requests = requests[:args.peer_num_prompts] if args.peer_num_prompts else requests
    peer_config = PeerConfig(batch_size=args.hf_batch_size, vllm_pythonpath=args.vllm_pythonpath,
                             enable_prefix_caching=engine_args.enable_prefix_caching,
                             kv_cache_dtype=engine_args.kv_cache_dtype,
                             calculate_kv_scales=engine_args.calculate_kv_scales,
                             cpu_kv_cache_tokens=_kv_cache_tokens(runs))
    peer_results = {name: PEER_RUNNERS[name](model_config, peer_requests, peer_config) for name in peers}
    return build_report(args, model, model_config, requests, runs, peer_results)


def _kv_cache_tokens(runs: dict[str, Any]) -> int:
    """Tokens the timed engine's KV cache holds (blocks x block size)."""
    run = runs["engine"]
    return run.num_kv_blocks * run.block_size


def run_base_and_lora(engine_args: EngineArgs, hf_config: Any, requests: list, num_loras: int, rank: int,
                      run_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The engine without LoRA ("engine_base"), then with ``num_loras`` dummy adapters ("engine")."""
    from sluice.bench.lora import spread_lora_requests, write_dummy_adapters
    from sluice.bench.throughput import run_sluice

    base_args = dataclasses.replace(engine_args, enable_lora=False)
    runs = {"engine_base": run_sluice(base_args, requests, name="sluice-base", **run_kwargs)}
    with tempfile.TemporaryDirectory(prefix="sluice-loras-") as folder:
        paths = write_dummy_adapters(hf_config, folder, num_loras, rank, seed=engine_args.seed)
        max_loras = engine_args.max_loras if engine_args.enable_lora else num_loras
        lora_args = dataclasses.replace(engine_args, enable_lora=True, max_loras=max_loras,
                                        max_lora_rank=max(rank, engine_args.max_lora_rank), max_cpu_loras=num_loras)
        runs["engine"] = run_sluice(lora_args, requests, name=f"sluice-{num_loras}-loras-r{rank}",
                                    lora_requests=spread_lora_requests(len(requests), paths), **run_kwargs)
    runs["engine"].result.extra["max_loras"] = max_loras
    return runs


def build_report(args: argparse.Namespace, model: ResolvedModel, model_config: Any, requests: list,
                 runs: dict[str, Any], peer_results: dict[str, Any]) -> dict[str, Any]:
    from sluice.bench.roofline import ModelShape, count_prefill_tokens, workload_roofline

    engine_run = runs["engine"]
    engine = engine_run.result
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[model_config.dtype]
    shape = dataclasses.replace(ModelShape.from_hf_config(model_config.hf_config, dtype_bytes),
                                kv_dtype_bytes=1 if model.engine_args.kv_cache_dtype != "auto" else 0)
    prompts = [r.prompt_token_ids for r in requests]
    prefill_tokens = count_prefill_tokens(prompts, model.engine_args.block_size,
                                          engine.extra["enable_prefix_caching"])
    roofline = workload_roofline(shape, [len(p) for p in prompts], [r.output_len for r in requests],
                                 max(engine_run.avg_batch, 1.0), prefill_tokens, args.hbm_bandwidth, args.peak_flops,
                                 decode_batches=engine_run.decode_batches)
    engine_settings = {f.name: getattr(model.engine_args, f.name) for f in dataclasses.fields(EngineArgs)
                       if not f.name.startswith("_")}
    report: dict[str, Any] = {
        "workload": args.workload, "device": device_name(model_config.device), "model": model.name,
        "dtype": model_config.dtype, "sluice_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_prompts": len(requests), "seed": model.engine_args.seed, "length_scale": args.length_scale,
        "structured_requests": sum(r.json_schema is not None for r in requests),
        "max_model_len": model_config.max_model_len, "num_kv_blocks": engine_run.num_kv_blocks,
        "engine": {"name": engine.name, **engine.to_dict(), "engine_args": engine_settings},
        "peers": {name: {**result.to_dict()} for name, result in peer_results.items()},
        "peer_num_prompts": len(requests[:args.peer_num_prompts]) if args.peer_num_prompts else len(requests),
        "peer_weights": ("dummy: same shapes and dtype as the engine, different random values"
                         if model_config.load_format == "dummy" else "the engine's checkpoint weights"),
        "ratio_metric": "output_tokens_per_s",
        "ratios": {name: engine.output_tokens_per_s / result.output_tokens_per_s
                   for name, result in peer_results.items()},
        "roofline_fraction": roofline.fraction(engine.elapsed_s),
        "roofline": {**roofline.to_dict(), "prefill_tokens": prefill_tokens,
                     "decode_weight_bytes": shape.decode_weight_bytes, "kv_bytes_per_token": shape.kv_bytes_per_token,
                     "step_weight_bytes_at_avg_batch": shape.step_weight_bytes(roofline.avg_batch)},
    }
    if "engine_prefix_caching_off" in runs:
        off = runs["engine_prefix_caching_off"].result
        report["engine_prefix_caching_off"] = {"name": off.name, **off.to_dict()}
        report["prefix_caching_speedup"] = off.elapsed_s / engine.elapsed_s
    if "engine_unquantized" in runs:
        base = runs["engine_unquantized"].result
        report["engine_unquantized"] = {"name": base.name, **base.to_dict()}
        report["quantization"] = model.engine_args.quantization
        report["quantized_speedup"] = engine.output_tokens_per_s / base.output_tokens_per_s
    if "engine_unconstrained" in runs:
        for key, ratio in (("engine_unconstrained", "structured_over_unconstrained"),
                           ("engine_unconstrained_matched", "structured_over_matched")):
            base = runs[key].result
            report[key] = {"name": base.name, **base.to_dict()}
            report[ratio] = engine.output_tokens_per_s / base.output_tokens_per_s
    if "engine_base" in runs:
        base = runs["engine_base"].result
        report["engine_base"] = {"name": base.name, **base.to_dict()}
        report["lora"] = {"num_loras": args.num_loras, "lora_rank": args.lora_rank,
                          "targets": "q, k, v, o, gate, up, down", "requests": "spread evenly (request i: i mod N)"}
        report["lora_over_base"] = engine.output_tokens_per_s / base.output_tokens_per_s
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table: one row per contender, ratio = engine over that row."""
    rows = [(report["engine"]["name"], report["engine"], None)]
    if "engine_prefix_caching_off" in report:
        off = report["engine_prefix_caching_off"]
        rows.append((off["name"], off, report["engine"]["output_tokens_per_s"] / off["output_tokens_per_s"]))
    if "engine_unquantized" in report:
        base = report["engine_unquantized"]
        rows.append((base["name"], base, report["quantized_speedup"]))
    if "engine_base" in report:
        base = report["engine_base"]
        rows.append((base["name"], base, report["engine"]["output_tokens_per_s"] / base["output_tokens_per_s"]))
    for key, ratio in (("engine_unconstrained", "structured_over_unconstrained"),
                       ("engine_unconstrained_matched", "structured_over_matched")):
        if key in report:
            rows.append((report[key]["name"], report[key], report[ratio]))
    rows += [(name, peer, report["ratios"][name]) for name, peer in report["peers"].items()]
    header = f"{'':<28}{'requests':>9}{'req/s':>10}{'output tok/s':>14}{'total tok/s':>13}{'engine/this':>13}"
    lines = [f"{report['workload']} on {report['device']}, model {report['model']} ({report['dtype']}), "
             f"{report['num_prompts']} requests, peers on {report['peer_num_prompts']}", header]
    for name, result, ratio in rows:
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"{name:<28}{result['num_requests']:>9}{result['requests_per_s']:>10.2f}"
                     f"{result['output_tokens_per_s']:>14.1f}{result['total_tokens_per_s']:>13.1f}{ratio_text:>13}")
    roofline = report["roofline"]
    lines.append(f"roofline fraction {report['roofline_fraction']:.3f} (lower bound {roofline['lower_bound_s']:.3g} s "
                 f"at avg batch {roofline['avg_batch']:.1f}; {roofline['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
                 f"{roofline['peak_flops'] / 1e12:.0f} TFLOP/s)")
    if "prefix_caching_speedup" in report:
        lines.append(f"prefix caching on vs off: {report['prefix_caching_speedup']:.2f}x")
    if "quantized_speedup" in report:
        lines.append(f"--quantization {report['quantization']} vs unquantized ({report['dtype']}): "
                     f"{report['quantized_speedup']:.2f}x output tok/s")
    if "structured_over_matched" in report:
        lines.append(f"structured over unconstrained, output tok/s: {report['structured_over_unconstrained']:.3f} "
                     f"(own lengths), {report['structured_over_matched']:.3f} (the constrained run's lengths)")
    if "lora_over_base" in report:
        lines.append(f"LoRA ({report['lora']['num_loras']} adapters, rank {report['lora']['lora_rank']}) over base, "
                     f"output tok/s: {report['lora_over_base']:.3f}")
    return "\n".join(lines)


def device_name(device: str) -> str:
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name()
    return device


def git_commit() -> str | None:
    """$SLUICE_COMMIT when set (a copy of the tree names what it is a copy of: its .git, if it has one, may be
    stale), else ``git rev-parse HEAD`` of the sluice checkout."""
    fallback = os.environ.get("SLUICE_COMMIT") or None
    if fallback:
        return fallback
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return fallback
    return (out.stdout.strip() if out.returncode == 0 else "") or fallback


