"""A real headless Chromium for page tests, driven over the DevTools protocol on a pipe (stdlib only).

Which browser: ``chromium-headless-shell`` or ``chromium`` on PATH (Debian's packages). When neither is there
and we run as root with apt-get (CI runs as root on Debian), ``ensure_chromium`` installs Debian's
``chromium-headless-shell`` (about 20 s with its libraries); where that cannot be done the test is skipped,
except under CI (``CI`` set), where it fails: the browser test must never vanish silently there.

The protocol runs over ``--remote-debugging-pipe`` (messages are JSON, each ended by a NUL byte; the browser
reads fd 3 and writes fd 4), so neither Playwright nor a websocket library is needed.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Any

import pytest

BROWSERS = ("chromium-headless-shell", "chromium", "google-chrome", "chrome")
APT_PACKAGES = ("chromium-headless-shell", "fonts-liberation")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def ensure_chromium() -> str:
    """A Chromium binary, installed from Debian's packages when missing and possible; else skip (fail in CI)."""
    path = find_chromium()
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES], env=env,
                       capture_output=True, timeout=600)
        path = find_chromium()
    if path is None:
        message = "no headless Chromium: apt-get install chromium-headless-shell"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must run the browser test)")
        pytest.skip(message)
    return path


class CDPError(RuntimeError):
    pass


class HeadlessChromium:
    """One browser with one page; ``call`` sends a DevTools command to the page and returns its result."""

    def __init__(self, binary: str, width: int = 1400, height: int = 1000) -> None:
        self._profile = tempfile.mkdtemp(prefix="sluice-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def map_fds() -> None:  # in the child: its fd 3 reads our commands, fd 4 carries its answers
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4 first
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--disable-dev-shm-usage", f"--user-data-dir={self._profile}", f"--window-size={width},{height}",
                # Nothing but the local server is reachable: a page needing a CDN would fail to load it.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "about:blank"]
        # pass_fds keeps 3 and 4, which map_fds made, open in the child.
        self.proc = subprocess.Popen(args, preexec_fn=map_fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    # ---- protocol ---------------------------------------------------------------------------------------
    def _send(self, method: str, params: dict | None = None, session: str | None = None,
              timeout: float = 30.0) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))[0]:
                continue
            for reply in self._read_messages():
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise CDPError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                self.events.append(reply)
        raise TimeoutError(f"no answer to {method} within {timeout} s")

    def _read_messages(self) -> list[dict]:
        chunk = os.read(self._from_browser, 1 << 20)
        if not chunk:
            raise CDPError("the browser closed its pipe")
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\0")
        return [json.loads(raw) for raw in complete if raw]

    def call(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        return self._send(method, params, self._session, timeout)

    # ---- page helpers ---------------------------------------------------------------------------------------
    def set_headers(self, headers: dict[str, str]) -> None:
        self.call("Network.setExtraHTTPHeaders", {"headers": headers})

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.2) -> Any:
        """Evaluates until the value is truthy; returns it."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except CDPError as e:  # the page is not there yet
                value = str(e)[:200]
                time.sleep(interval)
                continue
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"{expression!r} still {value!r} after {timeout} s")

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: str) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self._send("Browser.close", timeout=5)
        except (CDPError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)
