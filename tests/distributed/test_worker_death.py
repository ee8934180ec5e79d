"""A tensor-parallel worker that dies takes the engine down within seconds: never a hang.

Engine level: the next step raises TPWorkerDiedError naming the rank, and the watchdog ends the process with
exit code 1 even while nothing calls the engine. Server level: /health stops answering 200 and `sluice serve`
exits non-zero.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_models import save_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_WITHIN_S = 15.0

ENGINE_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from sluice import LLM, SamplingParams
    from sluice.distributed.executor import TPWorkerDiedError
    llm = LLM(model=sys.argv[1], dtype="float32", device="cpu", max_model_len=64, num_kv_blocks=32,
              tensor_parallel_size=2)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    (worker_pid,) = llm.llm_engine.core.runner.worker_pids
    os.kill(worker_pid, signal.SIGKILL)
    print("killed", time.monotonic(), flush=True)
    try:
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    except TPWorkerDiedError as exc:
        print("raised:", str(exc).splitlines()[0], flush=True)
    time.sleep(60)  # the watchdog ends the process long before this
    print("still alive", flush=True)
""")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _is_tp_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"sluice.distributed.worker" in f.read()
    except OSError:
        return False


def test_killed_worker_fails_the_next_step_and_ends_the_process(model_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", ENGINE_SCRIPT, str(model_path)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "killed" in stdout, stderr
    assert "raised: tensor-parallel worker rank 1" in stdout, stdout + stderr
    assert "still alive" not in stdout
    assert proc.returncode == 1
    assert "tensor-parallel worker rank 1" in stderr and "exiting" in stderr


def test_server_with_a_killed_worker_turns_unhealthy_and_exits_non_zero(model_path):
    server = RemoteServer(model_path, ["--tensor-parallel-size", "2", "--num-kv-blocks", "32", "--max-model-len", "64"])
    try:
        workers = [pid for pid in _descendants(server.proc.pid) if _is_tp_worker(pid)]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        while server.proc.poll() is None and time.monotonic() - killed < EXIT_WITHIN_S:
            try:
                healthy = httpx.get(server.url("/health"), timeout=1.0).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if not healthy:
                break
            time.sleep(0.1)
        assert not healthy, "the server still reports healthy"
        server.proc.wait(timeout=EXIT_WITHIN_S)
        assert server.proc.returncode != 0
        assert "tensor-parallel worker rank 1" in server.log()
    finally:
        server.stop()
