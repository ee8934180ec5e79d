"""Chat templates render in worker processes (render_pool.py): same text as in-process rendering, failures
mapped to what the handlers turn into 400s, and a render that ignores its deadline is killed without taking
the renders beside it down."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from sluice.chat_render import ChatRender, ChatTemplateLimitError
from sluice.entrypoints.openai.render_pool import KILL_GRACE_S, ChatRenderPool, TemplateRenderError
from sluice.tokenizer import prepare_chat_render, render_chat
from tests.tiny_models import build_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class StuckRender:
    """A render stuck where no template check reaches it (as in a C call that never returns)."""

    seconds: float

    def run(self, max_chars: int, timeout_s: float) -> str:
        time.sleep(self.seconds)
        return "never"


@pytest.fixture(scope="module")
def pool():
    pool = ChatRenderPool(num_workers=2)
    pool.start()
    yield pool
    pool.shutdown()


def render(pool: ChatRenderPool, job, max_chars: int = 10_000, timeout_s: float = 5.0) -> str:
    return asyncio.run(pool.render(job, max_chars, timeout_s))


def test_worker_renders_what_the_process_itself_renders(pool):
    tokenizer = build_tokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo \u2603"},
                {"role": "assistant", "content": "hi", "reasoning_content": "thinking"}]
    job = prepare_chat_render(tokenizer, messages, CHATML, True, {"enable_thinking": False})
    assert render(pool, job) == render_chat(tokenizer, messages, CHATML, True, {"enable_thinking": False})


@pytest.mark.parametrize("template, error", [
    ("{% for i in range(10) %}{{ 'x' * 100 }}{% endfor %}", ChatTemplateLimitError),  # past max_chars
    ("{% for x in messages %}{{ x.content }", TemplateRenderError),  # syntax error
    ("{{ raise_exception('no system role') }}", TemplateRenderError),
    ("{{ messages[0].content.no_such_method() }}", TemplateRenderError),
])
def test_failures_come_back_as_the_errors_handlers_map_to_400(pool, template, error):
    job = ChatRender(template, [{"role": "user", "content": "hi"}])
    with pytest.raises(error):
        render(pool, job, max_chars=500)
    assert render(pool, ChatRender(CHATML, [{"role": "user", "content": "ok"}])).endswith("assistant\n")


def test_a_slow_template_stops_at_its_deadline(pool):
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match="longer than 0.5 s"):
        render(pool, ChatRender(loop, [{"role": "user", "content": "hi"}]), timeout_s=0.5)
    assert time.monotonic() - start < 0.5 + KILL_GRACE_S


def test_a_stuck_render_is_killed_and_the_render_beside_it_still_answers(pool):
    healthy = ChatRender(CHATML, [{"role": "user", "content": "still here"}])

    async def both():
        stuck = asyncio.ensure_future(pool.render(StuckRender(60.0), 10_000, 0.5))
        await asyncio.sleep(0.2)  # the stuck one holds a worker; the healthy one gets the other
        ok = await pool.render(healthy, 10_000, 5.0)
        with pytest.raises(ChatTemplateLimitError):
            await stuck
        # Submitted after the kill: runs on the replacement pool.
        return ok, await pool.render(healthy, 10_000, 5.0)

    start = time.monotonic()
    first, after = asyncio.run(both())
    assert time.monotonic() - start < 0.5 + KILL_GRACE_S + 10  # nowhere near the 60 s the render would take
    assert "still here" in first and first == after
