"""render_chat: transformers' rendering, text for text, within a time and a size bound.

Normal templates render exactly as ``tokenizer.apply_chat_template(..., tokenize=False)``; a template that would
build a huge value is refused before it allocates it, and one that loops too long stops at its deadline."""
from __future__ import annotations

import time
import tracemalloc

import pytest

from sluice.models.default_model import default_model_path
from sluice.tokenizer import ChatTemplateLimitError, get_tokenizer, render_chat
from tests.tiny_models import HERMES_TEMPLATE

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello! <b>&</b>"}, {"role": "user", "content": "  spaces \n and lines  "}],
    [{"role": "user", "content": "é中文 \"quotes\" {{ not a template }}"},
     {"role": "assistant", "content": "", "reasoning_content": "thinking...", "tool_calls": None},
     {"role": "user", "content": "ok"}],
]

# Small templates that use what real chat templates use: loop state, namespaces, macros, set blocks, ~, filters,
# tojson, range, raise_exception, generation tags, extra variables.
TEMPLATES = {
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "features": """{%- set ns = namespace(count=0, last_user='') -%}
{%- macro turn(role, text) -%}
[{{ role | upper }}] {{ text }}
{%- endmacro -%}
{%- for m in messages -%}
    {%- if m.role not in ['system', 'user', 'assistant'] -%}{{ raise_exception('bad role ' ~ m.role) }}{%- endif -%}
    {%- set ns.count = ns.count + 1 -%}
    {%- if m.role == 'user' %}{% set ns.last_user = m.content %}{% endif -%}
    {{ turn(m.role, m.content if m.content is defined else '') }}
    {%- if m.reasoning_content is defined %} <think>{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif %}
    {% if loop.last %}({{ loop.index }}/{{ loop.length }}){% endif %}
{% endfor -%}
{%- set summary -%}
{{ ns.count }} turns; last user: {{ ns.last_user | tojson }}; {{ messages | map(attribute='role') | join(',') }}
{%- endset -%}
{{ summary | indent(2, true) }}
{{ {'n': ns.count, 'roles': messages | map(attribute='role') | list} | tojson(indent=2, sort_keys=true) }}
{% for i in range(3) | reverse %}{{ i }}{% if not loop.last %}-{% endif %}{% endfor %}
{{ "%s=%d" % ('turns', ns.count) }} {{ '{}:{}'.format('a', 1) }} {{ 'x' * 3 }}{{ [1, 2] + [3] }}{{ 2 ** 10 }}
{% if enable_thinking is defined and not enable_thinking %}<no_think>{% endif -%}
{% generation %}{% if add_generation_prompt %}ASSISTANT:{% endif %}{% endgeneration %}""",
    "loopcontrols": ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                     "{{ m.role }}: {{ m.content }}\n{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}"
                     "{{ eos_token }}"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(default_model_path())


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_the_default_models_template_renders_as_transformers(tokenizer, conversation, add_generation_prompt):
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert render_chat(tokenizer, conversation, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_small_templates_render_as_transformers(tokenizer, name, conversation):
    template, kwargs = TEMPLATES[name], {"enable_thinking": False}
    expected = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                             add_generation_prompt=True, **kwargs)
    assert render_chat(tokenizer, conversation, template, True, kwargs) == expected


def test_raise_exception_is_a_template_error_as_in_transformers(tokenizer):
    import jinja2
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role tool"):
        render_chat(tokenizer, [{"role": "tool", "content": "x"}], TEMPLATES["features"])


def _render_measured(tokenizer, template: str, **bounds) -> tuple[BaseException, float, int]:
    tracemalloc.start()
    start = time.monotonic()
    with pytest.raises(ChatTemplateLimitError) as refused:
        render_chat(tokenizer, CONVERSATIONS[0], template, **bounds)
    elapsed = time.monotonic() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return refused.value, elapsed, peak


HUGE_VALUES = [
    "{% set s = 'x' * 300000000 %}{{ s }}",
    "{{ 'x' | center(300000000) }}",
    "{{ '%0300000000d' % 1 }}",
    "{{ '{:>300000000}'.format(1) }}",
    "{{ 10 ** 300000000 }}",
    "{{ 'ab'.replace('', 'y' * 1000) * 1 }}{{ ('y' * 1000).join(range(100000)) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s=['x']) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% macro m(s) %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endmacro %}{% set t = m('x' * 1000) %}",
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
]


@pytest.mark.parametrize("template", HUGE_VALUES)
def test_a_huge_value_is_refused_before_it_is_built(tokenizer, template):
    error, elapsed, peak = _render_measured(tokenizer, template, max_chars=1_000_000)
    assert "over the limit of 1000000" in str(error)
    assert elapsed < 1.0 and peak < 50 * 2**20, (elapsed, peak)


def test_the_default_size_bound_refuses_300_million_characters(tokenizer):
    error, elapsed, peak = _render_measured(tokenizer, HUGE_VALUES[0])
    assert "300000000" in str(error) and elapsed < 1.0 and peak < 50 * 2**20


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for c in 'x' * 100000 %}{% for d in 'y' * 100000 %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for m in messages * 100000 %}{{ m.role[:0] }}{% endfor %}{% endfor %}",
])
def test_a_long_render_stops_at_its_deadline(tokenizer, template):
    error, elapsed, _ = _render_measured(tokenizer, template, timeout_s=0.5)
    assert "longer than 0.5 s" in str(error)
    assert 0.5 <= elapsed < 1.5


def test_the_output_is_bounded_as_it_is_generated(tokenizer):
    assert len(render_chat(tokenizer, CONVERSATIONS[0], "{{ 'x' * 1000 }}", max_chars=1000)) == 1000
    with pytest.raises(ChatTemplateLimitError, match="the rendered prompt"):
        render_chat(tokenizer, CONVERSATIONS[0], "{{ 'x' * 1000 }}{{ 'y' }}", max_chars=1000)


def test_tools_and_tool_calls_render_as_transformers(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    conversation = [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                    {"role": "tool", "content": "18 degrees", "tool_call_id": "call_1"}]
    expected = tokenizer.apply_chat_template(conversation, chat_template=HERMES_TEMPLATE, tools=tools,
                                             tokenize=False, add_generation_prompt=True)
    assert render_chat(tokenizer, conversation, HERMES_TEMPLATE, tools=tools) == expected
    assert '"name": "get_weather"' in expected and "<tool_response>\n18 degrees" in expected
