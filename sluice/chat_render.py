"""Bounded chat-template rendering: Jinja in transformers' sandbox, with a time and a size limit.

Needs jinja2 only (no tokenizer, no torch), so a process that only renders starts in a fraction of a second: the
server renders in such processes (entrypoints/openai/render_pool.py), where a template that is slow within its
bounds takes its own CPU time, not the API server's interpreter. ``ChatRender`` is one render's inputs, plain
data that pickles; ``ChatRender.run`` renders it as ``tokenizer.apply_chat_template(..., tokenize=False)`` does,
within its bounds: more than ``max_chars`` characters in the output or any value, or more than ``timeout_s``
seconds, is a ChatTemplateLimitError (a ValueError) before the render takes the process's time or memory.
"""
from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.filters
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import jinja2.visitor

# ---- bounded chat-template rendering ---------------------------------------------------------------------------
CHAT_TEMPLATE_TIMEOUT_S = 5.0  # a chat template renders in milliseconds; seconds means a loop without end
CHAT_TEMPLATE_MAX_CHARS = 16 * 2**20  # without a server's max_prompt_chars: more than any context holds


class ChatTemplateLimitError(ValueError):
    """A chat template ran past its time or size bound."""


@dataclass(slots=True)
class _RenderBudget:
    """One render's bounds: a deadline (time.monotonic) and the most characters any value or the output holds."""

    deadline: float
    timeout_s: float
    max_chars: int

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateLimitError(f"chat_template: rendering took longer than {self.timeout_s:g} s, the "
                                         "limit; the template loops too long")

    def check_size(self, num_chars: int, what: str) -> None:
        if num_chars > self.max_chars:
            raise ChatTemplateLimitError(f"chat_template: {what} would hold {num_chars} characters or more, over "
                                         f"the limit of {self.max_chars}")

    def collect(self, chunks: Iterable[str]) -> str:
        """The rendered text, checking its size and the deadline after every chunk the template yields."""
        parts, num_chars = [], 0
        for chunk in chunks:
            num_chars += len(chunk)
            self.check_size(num_chars, "the rendered prompt")
            self.check_time()
            parts.append(chunk)
        return "".join(parts)


_RENDER_BUDGET: ContextVar[_RenderBudget | None] = ContextVar("sluice_render_budget", default=None)


def _budget() -> _RenderBudget:
    budget = _RENDER_BUDGET.get()
    return budget if budget is not None else _RenderBudget(math.inf, math.inf, CHAT_TEMPLATE_MAX_CHARS)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


# A width or precision inside a %-format or str.format spec ("%0300000000d", "{:>300000000}").
_FORMAT_SPEC = re.compile(r"%[^a-zA-Z%]*[a-zA-Z%]|\{[^{}]*\}")
_DIGITS = re.compile(r"\d+")


def _check_format_widths(fmt: Any, budget: _RenderBudget) -> None:
    if isinstance(fmt, str):
        for spec in _FORMAT_SPEC.findall(fmt):
            for digits in _DIGITS.findall(spec):
                budget.check_size(int(digits) if len(digits) < 20 else 10**19, "a format width")


def _check_binop(operator: str, left: Any, right: Any, budget: _RenderBudget) -> None:
    """Refuses before computing a product, sum, power or format whose result would exceed the size bound."""
    if operator == "*":
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                budget.check_size(len(seq) * count, "a repeated value")
        if isinstance(left, int) and isinstance(right, int):  # digits of the product
            budget.check_size((left.bit_length() + right.bit_length()) * 3 // 10, "a product")
    elif operator == "+":
        budget.check_size(_size(left) + _size(right), "a concatenation")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        budget.check_size(left.bit_length() * right * 3 // 10, "a power")
    elif operator == "%":
        _check_format_widths(left, budget)


def _check_expansion(name: str, value: Any, args: tuple, kwargs: dict, budget: _RenderBudget) -> None:
    """Refuses a str method or filter that would pad or expand ``value`` past the size bound, before it runs."""
    if not isinstance(value, str):
        return
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        budget.check_size(args[0], f"{name}()")
    elif name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        budget.check_size(len(value) + (value.count("\n") + 1) * _size_or_int(width), "indent()")
    elif name == "expandtabs":
        budget.check_size(len(value) + value.count("\t") * _size_or_int(args[0] if args else 8), "expandtabs()")
    elif name == "wordwrap":
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring") or "\n"
        budget.check_size(len(value) * (1 + _size(wrap)), "wordwrap()")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        count = value.count(old) if old else len(value) + 1
        budget.check_size(len(value) + count * max(len(new) - len(old), 0), "replace()")
    elif name in ("format", "format_map"):
        _check_format_widths(value, budget)


def _size_or_int(width: Any) -> int:
    return width if isinstance(width, int) else _size(width)


def _bounded_join(separator: str, items: Iterable[Any], budget: _RenderBudget) -> str:
    texts, num_chars = [], 0
    for item in items:
        text = str(item)
        num_chars += len(text) + len(separator)
        budget.check_size(num_chars, "a joined value")
        texts.append(text)
    return separator.join(texts)


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` checked against the budget: the deadline and known expansions before, the result's size after."""
    # jinja2 passes the environment / context first to filters marked so; the value follows it
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.check_time()
        if len(args) > skip:
            _check_expansion(name, args[skip], args[skip + 1:], kwargs, budget)
        result = func(*args, **kwargs)
        budget.check_size(_size(result), f"the {name} filter's result")
        return result
    return bounded


@jinja2.pass_eval_context
def _join_filter(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
    """jinja2's join, bounded: items are counted as they are converted, never joined past the size bound."""
    if attribute is not None:
        value = map(jinja2.filters.make_attrgetter(eval_ctx.environment, attribute), value)
    if eval_ctx.autoescape:
        return jinja2.filters.do_join(eval_ctx, list(value), d)
    return _bounded_join(str(d), value, _budget())


def _bounded_iter(value: Any) -> Iterator[Any]:
    """What every {% for %} loop iterates: its own iterable, with the deadline checked before each item."""
    budget = _budget()
    for item in value:
        budget.check_time()
        yield item


def _concat(parts: list[Any]) -> str:
    """The ``~`` operator (a ~ b ~ c), bounded in size."""
    return _bounded_join("", parts, _budget())


class _BoundedRange:
    """``range`` for templates: jinja2's sandbox size cap, plus the deadline checked for each item."""

    def __init__(self, *args: int) -> None:
        self.values = jinja2.sandbox.safe_range(*args)

    def __iter__(self) -> Iterator[int]:
        budget = _budget()
        for value in self.values:
            budget.check_time()
            yield value

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: Any) -> Any:
        return self.values[index]

    def __contains__(self, value: Any) -> bool:
        return value in self.values

    def __reversed__(self) -> Iterator[int]:
        backwards = _BoundedRange(0)
        backwards.values = self.values[::-1]
        return iter(backwards)


class _BoundedBuffer(list):
    """The list a macro, {% set %} block, call block or filter block collects its output in, bounded in size."""

    def __init__(self, budget: _RenderBudget) -> None:
        super().__init__()
        self.budget = budget
        self.num_chars = 0

    def _count(self, num_chars: int) -> None:
        self.num_chars += num_chars
        self.budget.check_size(self.num_chars, "a block's output")
        self.budget.check_time()

    def append(self, item: Any) -> None:
        self._count(_size(item))
        super().append(item)

    def extend(self, items: Iterable[Any]) -> None:
        items = tuple(items)
        self._count(sum(map(_size, items)))
        super().extend(items)


class _BoundedCodeGenerator(jinja2.compiler.CodeGenerator):
    def buffer(self, frame: Any) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.bounded_buffer()")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() as transformers gives it: no underscore-prefixed attributes (no path to Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes on "
                                                  f"a namespace, got {name!r}")


class _TemplateDict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' filter: no HTML escaping, and json.dumps' options
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _BoundedTemplateEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' chat-template environment (trim_blocks, lstrip_blocks, loopcontrols, raise_exception,
    strftime_now, its tojson, dict and namespace), bounded by the current render's ``_RenderBudget``:

    - time: the deadline is checked at every call, attribute and item lookup, loop item (``range`` and every
      ``{% for %}``), filter, block write and output chunk;
    - size: ``*``, ``+``, ``**`` and ``%`` are intercepted and refused before they build a value past the bound,
      as are padding and replacing (center, indent, replace, format widths, ...); ``~``, join, every filter's
      result, every block's output and the rendered prompt are counted as they grow.
    """

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        filters = {**self.filters, "tojson": _tojson, "join": _join_filter}
        self.filters = {name: _bounded_filter(name, func) for name, func in filters.items()}
        self.filters["sluice_bounded_iter"] = _bounded_iter
        self.filters["sluice_concat"] = _concat
        self.globals.update(range=_BoundedRange, raise_exception=_raise_exception, strftime_now=_strftime_now,
                            dict=_TemplateDict(), namespace=_TemplateNamespace)

    def bounded_buffer(self) -> _BoundedBuffer:
        return _BoundedBuffer(_budget())

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.check_time()
        _check_binop(operator, left, right, budget)
        result = super().call_binop(context, operator, left, right)
        budget.check_size(_size(result), f"the result of {operator!r}")
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja2's
        budget = _budget()
        budget.check_time()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(__obj, "__name__", "")
            if name == "join" and len(args) == 1 and not kwargs:
                return _bounded_join(owner, args[0], budget)
            _check_expansion(name, owner, args, kwargs, budget)
        result = super().call(__context, __obj, *args, **kwargs)
        budget.check_size(_size(result), "a call's result")
        return result

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget = _budget()
        budget.check_time()
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            _check_format_widths(obj, budget)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().check_time()
        return super().getitem(obj, argument)


class _BoundLoops(jinja2.visitor.NodeTransformer):
    """Routes every {% for %} iterable and every ``~`` through the bounded filters above."""

    def visit_For(self, node: jinja2.nodes.For) -> jinja2.nodes.For:
        self.generic_visit(node)
        node.iter = jinja2.nodes.Filter(node.iter, "sluice_bounded_iter", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Filter:
        self.generic_visit(node)
        return jinja2.nodes.Filter(jinja2.nodes.List(node.nodes, lineno=node.lineno), "sluice_concat", [], [],
                                   None, None, lineno=node.lineno)


_TEMPLATE_ENVIRONMENT = _BoundedTemplateEnvironment()


@functools.lru_cache(maxsize=32)
def _compile_chat_template(text: str) -> jinja2.Template:
    """Compiled once per template text; compiling folds constants, so it runs within the caller's budget too."""
    return _TEMPLATE_ENVIRONMENT.from_string(_BoundLoops().visit(_TEMPLATE_ENVIRONMENT.parse(text)))


def plain_template_data(value: Any) -> Any:
    """The template sees plain JSON-like data only (as in transformers): anything else becomes ``<TypeName>``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if callable(getattr(value, "model_dump", None)):
        return plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning_fields(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A message's reasoning under every name templates read it by, as transformers passes it."""
    aliased = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


@dataclass(frozen=True, slots=True)
class ChatRender:
    """One chat render's inputs, as plain data: the template's text, the messages and the variables the template
    sees (special tokens, then the caller's), already made plain by ``plain_template_data``."""

    template: str
    messages: list[dict[str, Any]]
    variables: dict[str, Any] = field(default_factory=dict)
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None

    def run(self, max_chars: int = CHAT_TEMPLATE_MAX_CHARS, timeout_s: float = CHAT_TEMPLATE_TIMEOUT_S) -> str:
        """The rendered prompt text, within ``max_chars`` characters and ``timeout_s`` seconds."""
        budget = _RenderBudget(time.monotonic() + timeout_s, timeout_s, max_chars)
        token = _RENDER_BUDGET.set(budget)
        try:
            compiled = _compile_chat_template(self.template)
            chat = _alias_reasoning_fields([{k: v for k, v in m.items() if v is not None} for m in self.messages])
            return budget.collect(compiled.generate(messages=chat, tools=self.tools, documents=self.documents,
                                                    add_generation_prompt=self.add_generation_prompt,
                                                    **self.variables))
        finally:
            _RENDER_BUDGET.reset(token)
