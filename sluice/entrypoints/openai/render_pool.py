"""Chat templates render in processes of their own, so that a slow render slows only its own request.

A template is code: within its bounds (chat_render.py: CHAT_TEMPLATE_TIMEOUT_S, the server's longest prompt) one
can still loop for seconds. Rendered in the API server's threads it would hold the interpreter that streams every
other request's tokens; rendered here it takes one worker process's CPU time, and the API server only waits on a
pipe. Workers run at a lower priority (RENDER_NICENESS), so on a machine with few cores a template that loops
takes the time the engine and the API server leave over, not theirs.

    handler --ChatRender (plain data)--> ChatRenderPool.render --pickle--> worker process: ChatRender.run
            <-- text, or a RenderFailure naming why -------------------------------------'

Workers import chat_render only (jinja2, no torch, no tokenizer) and start with the server. A render that outlives
its deadline by KILL_GRACE_S (stuck where the template's checks cannot reach) has its worker process killed and the
pool replaced; renders that were sharing the old pool run again on the new one.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from sluice.chat_render import ChatRender, ChatTemplateLimitError

KILL_GRACE_S = 2.0  # past its own deadline by this much, a render's process is killed
RENDER_NICENESS = 10  # workers yield the CPU to the engine and the API server when they compete for it


def default_num_workers() -> int:
    """Two workers at least (one slow template must not queue the rest), up to four."""
    return max(2, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2))


@dataclass(frozen=True, slots=True)
class RenderFailure:
    """Why a render failed, as plain data (a template's own exception types may not survive pickling)."""

    kind: str  # "limit" (time or size bound) | "value" (the messages or variables) | "template" (jinja2) | "other"
    message: str

    def to_exception(self) -> Exception:
        if self.kind == "limit":
            return ChatTemplateLimitError(self.message)
        if self.kind == "value":
            return ValueError(self.message)
        if self.kind == "template":
            return TemplateRenderError(self.message)
        return RuntimeError(self.message)


class TemplateRenderError(Exception):
    """The template itself failed (a Jinja syntax or runtime error, or raise_exception in the template)."""


def _render_in_worker(job: ChatRender, max_chars: int, timeout_s: float) -> str | RenderFailure:
    try:
        return job.run(max_chars, timeout_s)
    except ChatTemplateLimitError as e:
        return RenderFailure("limit", str(e))
    except (ValueError, TypeError) as e:
        if type(e).__module__.startswith("jinja2"):
            return RenderFailure("template", str(e))
        return RenderFailure("value", str(e))
    except Exception as e:  # noqa: BLE001 - whatever the template raised goes back as data
        kind = "template" if type(e).__module__.startswith("jinja2") else "other"
        return RenderFailure(kind, f"{type(e).__name__}: {e}")


def _start_worker() -> None:
    try:
        os.nice(RENDER_NICENESS)
    except OSError:  # not permitted here: render at the server's priority
        pass


def _warm_up() -> int:
    return os.getpid()


class ChatRenderPool:
    def __init__(self, num_workers: int | None = None) -> None:
        self.num_workers = num_workers or default_num_workers()
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Starts the workers now (the server's start-up) rather than at the first chat."""
        self._current()

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = self._new_executor()
            return self._executor

    def _new_executor(self) -> ProcessPoolExecutor:
        # spawn: the API server runs threads (engine client, tokenizer pool); forking it would copy their locks.
        executor = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_start_worker)
        for _ in range(self.num_workers):
            executor.submit(_warm_up)  # start the workers now, not on the first chat
        return executor

    async def render(self, job: ChatRender, max_chars: int, timeout_s: float) -> str:
        """The rendered text; ChatTemplateLimitError past the bounds, ValueError for bad messages or variables,
        TemplateRenderError when the template fails."""
        for attempt in range(2):
            executor = self._current()
            try:
                future = asyncio.wrap_future(executor.submit(_render_in_worker, job, max_chars, timeout_s))
                result = await asyncio.wait_for(future, timeout_s + KILL_GRACE_S)
            except asyncio.TimeoutError:
                self._replace(executor)
                raise ChatTemplateLimitError(f"chat_template: rendering took longer than {timeout_s:g} s, the "
                                             "limit; the template loops too long") from None
            except BrokenProcessPool:
                # Another request's render was killed (or a worker died): this one never ran to its end.
                self._replace(executor)
                if attempt == 0:
                    continue
                raise RuntimeError("the chat template render process died") from None
            if isinstance(result, RenderFailure):
                raise result.to_exception()
            return result
        raise AssertionError("unreachable")

    def _replace(self, executor: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is not executor:
                return  # another render replaced it already
            self._executor = self._new_executor()
        # ProcessPoolExecutor cannot cancel a running task: its processes are ended instead.
        for process in list(getattr(executor, "_processes", {}).values()):
            process.kill()
        executor.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
