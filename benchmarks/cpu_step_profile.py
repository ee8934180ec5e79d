"""Where a CPU step's time goes with n running requests (1, 16, 256 by default).

    python benchmarks/cpu_step_profile.py --model /tmp/tiny --dtype bfloat16 [--sizes 1,16,256] [--steps 32]
    python benchmarks/cpu_step_profile.py --model /tmp/tiny --decode-only [--steps 40]

For each n: n prompts of 128 random token ids, greedy, ``--steps`` output tokens each, timed by wrapping the
model runner: attention (the backend's plan, write_kv and forward, summed over layers), the rest of the model
forward, the LM head (logits), the sampler, the runner's own work, and the rest of the engine step. Figures are
per output step (wall / steps), prompt steps included. Prints one ``PROFILE n {...}`` line per size.

``--decode-only``: the n requests (prompts of 128 tokens, 512 output tokens at most) are prefilled and decoded
for 40 steps first; then ``--steps`` pure decode steps are timed (``step_ms``: one engine step with n running
requests, their contexts growing from about 170 tokens). Prints ``DECODE n {...}``.
"""
import argparse
import collections
import json
import random
import time

from sluice import LLM, SamplingParams


def find_runner(obj, depth=0, seen=None):
    seen = set() if seen is None else seen
    if depth > 6 or id(obj) in seen:
        return None
    seen.add(id(obj))
    if type(obj).__name__ == "ModelRunner":
        return obj
    for value in getattr(obj, "__dict__", {}).values():
        found = find_runner(value, depth + 1, seen)
        if found is not None:
            return found
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sizes", default="1,16,256")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--decode-only", action="store_true", help="time decode steps alone (see the docstring)")
    args = ap.parse_args()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=2048, seed=0, max_num_seqs=256,
              kv_cache_memory=2 * 1024**3)
    runner = find_runner(llm)  # in-process engine core (LLM's default)
    seconds = collections.Counter()

    def timed(obj, name, key):
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[key] += time.perf_counter() - start
        setattr(obj, name, wrapper)

    for name in ("plan", "write_kv", "forward"):
        timed(runner.attn_backend, name, "attention")
    timed(runner, "_forward", "model_forward")
    timed(runner.model, "compute_logits", "logits")
    timed(runner.sampler, "sample", "sampler")
    timed(runner, "launch", "runner_step")
    timed(runner, "collect", "runner_step")
    rng = random.Random(0)

    def report(label: str, n: int, wall: float, wall_key: str) -> None:
        row = {key: round(value * 1e3 / args.steps, 2) for key, value in seconds.items()}
        row["model_other"] = round(row["model_forward"] - row["attention"], 2)
        row["engine_other"] = round(wall * 1e3 / args.steps - row["runner_step"], 2)
        row[wall_key] = round(wall * 1e3 / args.steps, 2)
        row["out_tok_per_s"] = round(n * args.steps / wall, 1)
        print(label, n, json.dumps(row), flush=True)

    for n in (int(s) for s in args.sizes.split(",")):
        prompts = [{"prompt_token_ids": [rng.randrange(4, 32000) for _ in range(128)]} for _ in range(n)]
        if args.decode_only:
            engine = llm.llm_engine
            ids = [f"{n}-{i}" for i in range(n)]
            params = SamplingParams(temperature=0.0, max_tokens=512, ignore_eos=True)
            for request_id, prompt in zip(ids, prompts):
                engine.add_request(request_id, prompt, params)
            for _ in range(40):
                engine.step()
            seconds.clear()
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            report("DECODE", n, time.perf_counter() - start, "step_ms")
            engine.abort_request(ids)
            continue
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        seconds.clear()
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True),
                     use_tqdm=False)
        report("PROFILE", n, time.perf_counter() - start, "wall_per_out_step_ms")

if __name__ == "__main__":
    main()
