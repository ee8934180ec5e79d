"""vLLM as a peer of ``sluice bench throughput`` (``--peers vllm``): the real vLLM engine, in a process of its own,
on the same requests.

    bench process                                             peer process (python -m sluice.bench.vllm_peer)
      run_vllm: job.json = model folder, tokenizer, dtype,  -->  PYTHONPATH = vLLM's install + this checkout
                load format, max_model_len, prefix caching,      LLM(...) at vLLM's own defaults otherwise;
                seed, every request's prompt ids and length      warmup (untimed), one timed generate;
      <-- result.json: elapsed, output tokens, start-up, vLLM's version, the requests' fingerprint

vLLM is found where ``--vllm-pythonpath`` (or SLUICE_VLLM_PYTHONPATH) says; it is never imported into the bench's
own process (its torch, its CUDA context and its compiled graphs stay in the peer's). Sampling is the engine's:
temperature 1.0, top_p 1.0, eos ignored, ``output_len`` tokens per request, no detokenization. Both sides print and
record the fingerprint of the requests they ran, so a report shows that they ran the same ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VLLM_PYTHONPATH_ENV = "SLUICE_VLLM_PYTHONPATH"
NUM_WARMUP = 4  # as the engine's run: the first requests, reversed prompts, a few output tokens
WARMUP_OUTPUT_TOKENS = 8


def fingerprint(requests: Sequence[tuple[Sequence[int], int]]) -> str:
    """A short digest of the requests (prompt ids and output lengths, in order)."""
    digest = hashlib.sha256()
    for prompt, output_len in requests:
        digest.update(json.dumps([list(prompt), output_len]).encode())
    return digest.hexdigest()[:16]


def find_vllm(pythonpath: str | None) -> str:
    """The folder vLLM is installed in: ``pythonpath`` or $SLUICE_VLLM_PYTHONPATH; ValueError when neither holds a
    ``vllm`` package (checked by path: importing vLLM takes seconds and belongs to the peer process)."""
    path = pythonpath or os.environ.get(VLLM_PYTHONPATH_ENV)
    if not path:
        raise ValueError(f"peers: vllm needs --vllm-pythonpath (or {VLLM_PYTHONPATH_ENV}): the folder vLLM is "
                         "installed in")
    if not (Path(path) / "vllm" / "__init__.py").is_file():
        raise ValueError(f"--vllm-pythonpath: {path} holds no vllm package (no vllm/__init__.py)")
    return path


def run_vllm(model_config: Any, requests: Sequence[Any], config: Any) -> Any:
    """PEER_RUNNERS["vllm"]: runs the peer process and returns its ThroughputResult."""
    from sluice.bench.throughput import ThroughputResult

    vllm_path = find_vllm(config.vllm_pythonpath)
    if os.path.isfile(model_config.model):
        raise ValueError(f"peers: vllm runs Hugging Face folders, not {model_config.model!r}")
    job = {
        "model": model_config.model, "tokenizer": model_config.tokenizer or model_config.model,
        "dtype": model_config.dtype, "load_format": model_config.load_format,
        "max_model_len": model_config.max_model_len, "seed": model_config.seed,
        "enable_prefix_caching": config.enable_prefix_caching,
        "kv_cache_dtype": config.kv_cache_dtype, "calculate_kv_scales": config.calculate_kv_scales,
        "requests": [[list(r.prompt_token_ids), r.output_len] for r in requests],
    }
    checkout = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([vllm_path, checkout, os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(prefix="sluice-vllm-peer-") as scratch:
        job_path, result_path = Path(scratch) / "job.json", Path(scratch) / "result.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "sluice.bench.vllm_peer", str(job_path), str(result_path)],
                              env=env, timeout=config.vllm_timeout_s, check=False)
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"the vllm peer exited with status {proc.returncode} (its output is above)")
        result = json.loads(result_path.read_text())
    expected = fingerprint(job["requests"])
    if result["fingerprint"] != expected:
        raise RuntimeError(f"the vllm peer ran other requests (fingerprint {result['fingerprint']}, "
                           f"expected {expected})")
    return ThroughputResult.from_requests(
        "vllm", requests, result["elapsed_s"], output_tokens=result["output_tokens"],
        extra={"vllm_version": result["vllm_version"], "startup_s": result["startup_s"],
               "requests_fingerprint": result["fingerprint"], "engine_args": result["engine_args"]})


# ---- the peer process ------------------------------------------------------------------------------------------
def _peer_main(job_path: str, result_path: str) -> int:
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # top_p 1 and no top_k: the plain sampler's work
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    job = json.loads(Path(job_path).read_text())
    requests = [(prompt, output_len) for prompt, output_len in job["requests"]]
    print(f"vllm peer: {len(requests)} requests, fingerprint {fingerprint(requests)}", flush=True)

    start = time.perf_counter()
    import vllm

    engine_args = {"model": job["model"], "tokenizer": job["tokenizer"], "dtype": job["dtype"],
                   "load_format": job["load_format"], "max_model_len": job["max_model_len"], "seed": job["seed"],
                   "enable_prefix_caching": job["enable_prefix_caching"], "skip_tokenizer_init": False,
                   "kv_cache_dtype": job.get("kv_cache_dtype", "auto")}
    if job.get("calculate_kv_scales"):
        engine_args["calculate_kv_scales"] = True
    llm = vllm.LLM(**engine_args)
    startup_s = time.perf_counter() - start

    def params(output_len: int) -> Any:
        return vllm.SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len,
                                   detokenize=False)

    warmup = requests[:NUM_WARMUP]
    llm.generate([{"prompt_token_ids": prompt[::-1]} for prompt, _ in warmup],
                 [params(min(WARMUP_OUTPUT_TOKENS, n)) for _, n in warmup], use_tqdm=False)
    _sync()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt, _ in requests],
                           [params(n) for _, n in requests], use_tqdm=False)
    _sync()
    elapsed = time.perf_counter() - start
    produced = [len(o.outputs[0].token_ids) for o in outputs]
    wanted = [n for _, n in requests]
    if produced != wanted:
        bad = next(i for i, (p, w) in enumerate(zip(produced, wanted)) if p != w)
        raise RuntimeError(f"vllm returned {produced[bad]} tokens for request {bad}, expected {wanted[bad]}")
    Path(result_path).write_text(json.dumps({
        "elapsed_s": elapsed, "output_tokens": sum(produced), "startup_s": startup_s,
        "vllm_version": getattr(vllm, "__version__", "unknown"), "fingerprint": fingerprint(requests),
        "engine_args": engine_args}))
    return 0


def _sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(_peer_main(sys.argv[1], sys.argv[2]))
