"""A real `sluice serve` in a subprocess on 127.0.0.1 (a free port), for end-to-end tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """Starts the server, waits for /health, and stops it (SIGKILL as a last resort)."""

    def __init__(self, model: str | Path | None, extra_args: list[str], api_key: str | None = None,
                 env: dict[str, str] | None = None, startup_timeout: float = 120.0, model_as_flag: bool = False) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.base_url = f"http://127.0.0.1:{self.port}"
        model_args = [] if model is None else ["--model", str(model)] if model_as_flag else [str(model)]
        # vllm serve accepts both; no model: the embedded default one
        args = [sys.executable, "-m", "sluice.entrypoints.cli", "serve", *model_args, "--host", "127.0.0.1",
                "--port", str(self.port), "--device", "cpu", "--disable-uvicorn-access-log", *extra_args]
        if api_key:
            args += ["--api-key", api_key]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sluice-server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self._wait_healthy(startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url("/health"), timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def url(self, path: str) -> str:
        return self.base_url + path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url("/v1"), api_key=self.api_key or "none", max_retries=0, **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url("/v1"), api_key=self.api_key or "none", max_retries=0,
                                  **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {name: value}, labels other than model_name folded in by sum."""
        text = httpx.get(self.url("/metrics"), timeout=10).text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
                key = sample.name + "".join(f"[{k}={v}]" for k, v in sorted(labels.items()))
                values[key] = values.get(key, 0.0) + sample.value
        return values

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
