"""Does one expensive request stall the others? A probe against a real `sluice serve` on the CPU.

    python benchmarks/stall_probe.py [--out benchmarks/results/<date>_CPU_stall_probe_<commit>.json]

Starts `sluice serve` (the embedded default model, --trust-request-chat-template) as a subprocess, then times a
short chat request (the "probe": one user turn, 8 tokens) alone, and again while each of these runs beside it:

  slow_template   a chat request whose own template takes a few seconds to render (inside the render bound)
  huge_prompt     completions requests with a 9.9 MB prompt, one after another (refused by the prompt-length
                  check, after the body is read and parsed)
  stop_strings    a completion of 256 tokens with 64 stop strings of 1024 characters each (the most allowed)

Rendering and tokenizing run in the API server's tokenizer pool, but share its interpreter (the GIL) with the
event loop that serves every request; the probe's latency shows what that sharing costs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from tests.entrypoints.server_utils import RemoteServer  # noqa: E402

PROBE = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0.0,
         "ignore_eos": True}
SLOW_TEMPLATE = ("{% for i in range(OUTER) %}{% for j in range(1000) %}{% endfor %}{% endfor %}"
                 "{% for m in messages %}{{ m.content }}{% endfor %}")


def slow_template(seconds: float) -> str:
    """A template whose render takes about ``seconds`` here, measured with sluice's own renderer."""
    from sluice.models.default_model import default_model_path
    from sluice.tokenizer import get_tokenizer, render_chat
    tokenizer = get_tokenizer(default_model_path())
    outer = 100
    while True:
        template = SLOW_TEMPLATE.replace("OUTER", str(outer))
        start = time.monotonic()
        render_chat(tokenizer, PROBE["messages"], template, timeout_s=60)
        elapsed = time.monotonic() - start
        if elapsed > 0.5:
            return SLOW_TEMPLATE.replace("OUTER", str(int(outer * seconds / elapsed)))
        outer *= 4


def timed_post(client: httpx.Client, path: str, body: dict) -> tuple[float, int]:
    start = time.perf_counter()
    response = client.post(path, json=body, timeout=120)
    return time.perf_counter() - start, response.status_code


def probe_latencies(client: httpx.Client, count: int, busy: threading.Event | None = None) -> list[float]:
    """``count`` probe requests one after another; with ``busy``, only while it is set."""
    latencies = []
    while len(latencies) < count and (busy is None or busy.is_set()):
        elapsed, status = timed_post(client, "/v1/chat/completions", PROBE)
        assert status == 200, status
        if busy is None or busy.is_set():
            latencies.append(elapsed)
    return latencies


def summary(latencies: list[float]) -> dict:
    return {"n": len(latencies), "median_ms": round(1000 * statistics.median(latencies), 1),
            "max_ms": round(1000 * max(latencies), 1), "min_ms": round(1000 * min(latencies), 1)}


def beside(client: httpx.Client, path: str, body: dict, count: int, repeat: bool = False) -> dict:
    """Probe latencies while the ``body`` request runs in a thread (once, or with ``repeat`` one after another
    until the probes are done); only probes that finish while it still runs count."""
    busy, done, results = threading.Event(), threading.Event(), []

    def run_background() -> None:
        with httpx.Client(base_url=client.base_url) as own:
            while True:
                results.append(timed_post(own, path, body))
                if not repeat or done.is_set():
                    break
        busy.clear()

    busy.set()
    thread = threading.Thread(target=run_background)
    thread.start()
    time.sleep(0.2)  # the background request is in the server
    latencies = probe_latencies(client, count, busy)
    done.set()
    thread.join()
    seconds = [s for s, _ in results]
    return {"probe": summary(latencies) if latencies else None,
            "background": {"requests": len(results), "statuses": sorted({code for _, code in results}),
                           "median_s": round(statistics.median(seconds), 3)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--render-seconds", type=float, default=3.0)
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = args.out or REPO_ROOT / "benchmarks" / "results" / \
        f"{datetime.date.today().isoformat()}_CPU_stall_probe_{commit}.json"
    template = slow_template(args.render_seconds)
    server = RemoteServer(None, ["--trust-request-chat-template"])  # the embedded default model
    try:
        with httpx.Client(base_url=server.base_url) as client:
            probe_latencies(client, 3)  # warm-up
            alone = summary(probe_latencies(client, args.probes))
            slow = {**PROBE, "max_tokens": 1, "chat_template": template}
            huge = {"prompt": "x" * (99 * 10**5), "max_tokens": 1}
            stops = {"prompt": "Once upon a time", "max_tokens": 256, "ignore_eos": True, "temperature": 0.0,
                     "stop": [f"{i:04d}" + "z" * 1020 for i in range(64)]}
            result = {
                "commit": commit, "cpus": os.cpu_count(), "model": "default (SmolLM2-135M-Instruct Q4_1)",
                "server_flags": ["--trust-request-chat-template", "--device", "cpu"],
                "probe_request": PROBE, "alone": alone,
                "slow_template": {"render_seconds_target": args.render_seconds,
                                  **beside(client, "/v1/chat/completions", slow, args.probes, repeat=True)},
                "huge_prompt": {"prompt_chars": len(huge["prompt"]),
                                **beside(client, "/v1/completions", huge, args.probes, repeat=True)},
                "stop_strings": beside(client, "/v1/completions", stops, args.probes),
                "alone_after": summary(probe_latencies(client, args.probes)),
            }
    finally:
        server.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
