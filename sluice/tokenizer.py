"""Tokenizers and chat templates for every kind of model path sluice accepts.

- An HF folder: ``AutoTokenizer`` (tokenizer.json / tokenizer_config.json / chat_template.jinja), never the network.
- A ``.gguf`` file: the tokenizer and chat template stored in its metadata (see ``models/gguf_loader.py``).
- ``skip_tokenizer_init``: no tokenizer at all (token-id prompts in, token ids out, empty text), as vLLM's.
  A folder with no tokenizer files and without that flag fails at start-up with one line
  (``check_tokenizer_files``, called when the engine config is resolved), not deep inside transformers.

Chat prompts are rendered to text by the model's Jinja template and then encoded without adding special tokens
(the template writes its own BOS, as vLLM does). Rendering takes a template's text, never a path: only
``get_chat_template`` (for the command line and the offline API) reads a file, so no request can make the
server read one. Templates render as transformers renders them (the same sandboxed Jinja environment, the same
variables), but bounded: a render that runs past CHAT_TEMPLATE_TIMEOUT_S or builds any value or output longer than
its character bound (the server's max_prompt_chars) stops with a ChatTemplateLimitError, a ValueError, before it
takes the process's time or memory. Extra template variables (``enable_thinking``, ...) must be identifiers that are not
``apply_chat_template``'s own parameters (``tokenize`` would return text where ids are expected). ``end_of_turn_token_ids`` finds the token a template closes an
assistant turn with (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3), so a chat stops there even when the
tokenizer's eos is a different token.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
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

from transformers import AutoTokenizer, PreTrainedTokenizerBase

ChatMessage = dict[str, Any]  # {"role": "user", "content": "..."}, as the OpenAI API and HF templates use

# Tried when the template cannot be probed: end-of-turn tokens of the common template families.
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
_PROBE = "sluice-probe-7f3a"


def is_gguf_path(path: str) -> bool:
    return path.lower().endswith(".gguf") and not os.path.isdir(path)


# Any of these makes a folder loadable by AutoTokenizer (fast, SentencePiece, BPE vocab files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "tiktoken.model")


def check_tokenizer_files(path: str) -> None:
    """ValueError, one line naming the folder and the flag, when ``path`` is a folder without tokenizer files."""
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ValueError(f"tokenizer: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                         "give --tokenizer, or pass --skip-tokenizer-init (skip_tokenizer_init=True) to work in "
                         "token ids")


def load_tokenizer(model_config: Any) -> tuple[PreTrainedTokenizerBase | None, str | None]:
    """(tokenizer, chat template) of a resolved ModelConfig; (None, None) with skip_tokenizer_init."""
    if model_config.skip_tokenizer_init:
        return None, None
    tokenizer = get_tokenizer(model_config.model, model_config.tokenizer)
    return tokenizer, get_chat_template(tokenizer)


def get_tokenizer(model_path: str, tokenizer_path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer for ``tokenizer_path`` if given, else for ``model_path`` (an HF folder or a .gguf file)."""
    path = tokenizer_path or model_path
    if not path:
        raise ValueError("tokenizer: no model or tokenizer path given")
    if is_gguf_path(path):
        from sluice.models.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer: {path} is neither a model folder nor a .gguf file")
    check_tokenizer_files(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def get_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> str | None:
    """The template to render chats with: ``chat_template`` if given (Jinja text or a path to a file holding it),
    else the model's own (tokenizer_config.json / chat_template.jinja, or the GGUF's metadata); None if neither."""
    if chat_template is not None:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                return f.read()
        return chat_template
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the "default" one is for chat
        template = template.get("default")
    return template


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


def _plain_template_data(value: Any) -> Any:
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
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
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


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage],
                chat_template: str | None = None, add_generation_prompt: bool = True,
                template_kwargs: Mapping[str, Any] | None = None, *, max_chars: int | None = None,
                timeout_s: float = CHAT_TEMPLATE_TIMEOUT_S, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The conversation as the prompt text the model was trained on. ``chat_template``: Jinja text (never a
    path; see get_chat_template), else the model's own; ``template_kwargs``: extra template variables;
    ``tools``: function definitions ({"type": "function", "function": {...}}) for templates that list them.

    Renders as ``tokenizer.apply_chat_template(..., tokenize=False)`` does, in a bounded sandbox (see
    ``_BoundedTemplateEnvironment``): more than ``max_chars`` characters (default CHAT_TEMPLATE_MAX_CHARS) in the
    output or any value, or more than ``timeout_s`` seconds, is a ChatTemplateLimitError (a ValueError)."""
    template = chat_template if chat_template is not None else get_chat_template(tokenizer)
    if template is None:
        raise ValueError("chat_template: the model has no chat template; pass one (Jinja text or a file path)")
    if not messages:
        raise ValueError("messages: a chat needs at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"messages[{index}]: expected a dict with 'role' and 'content', got {message!r}")
    template_kwargs = dict(template_kwargs or {})
    check_template_kwargs(tokenizer, template_kwargs)
    # What transformers' apply_chat_template hands its template: messages without None values (reasoning also
    # under the names templates read), the special tokens, then the caller's variables over them.
    variables = {**tokenizer.special_tokens_map, **_plain_template_data(template_kwargs)}
    chat = _alias_reasoning_fields([{k: v for k, v in _plain_template_data(m).items() if v is not None}
                                    for m in messages])
    budget = _RenderBudget(time.monotonic() + timeout_s, timeout_s,
                           max_chars if max_chars is not None else CHAT_TEMPLATE_MAX_CHARS)
    token = _RENDER_BUDGET.set(budget)
    try:
        compiled = _compile_chat_template(template)
        return budget.collect(compiled.generate(messages=chat, tools=_plain_template_data(list(tools or [])) or None,
                                                documents=None, add_generation_prompt=add_generation_prompt,
                                                **variables))
    finally:
        _RENDER_BUDGET.reset(token)


def check_template_kwargs(tokenizer: PreTrainedTokenizerBase, template_kwargs: dict[str, Any]) -> None:
    """ValueError unless every key is an identifier the template can read as a variable."""
    reserved = _apply_chat_template_parameters(type(tokenizer))
    for key in template_kwargs:
        if not isinstance(key, str) or not key.isidentifier() or key in reserved:
            raise ValueError(f"chat_template_kwargs: {key!r} is not allowed (keys must be identifiers other than "
                             f"{', '.join(sorted(reserved))})")


@functools.cache
def _apply_chat_template_parameters(tokenizer_class: type) -> frozenset[str]:
    parameters = inspect.signature(tokenizer_class.apply_chat_template).parameters.values()
    return frozenset({"messages"} | {p.name for p in parameters if p.kind is not p.VAR_KEYWORD and p.name != "self"})


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage],
                        chat_template: str | None = None, add_generation_prompt: bool = True,
                        tokenize: bool = True, **template_kwargs: Any) -> list[int] | str:
    """Render ``messages`` with the chat template; token ids when ``tokenize`` (the default), else the text.

    Encoding adds no special tokens: the template already wrote any BOS the model wants.
    """
    text = render_chat(tokenizer, messages, chat_template, add_generation_prompt, template_kwargs)
    if not tokenize:
        return text
    return tokenizer.encode(text, add_special_tokens=False)


def end_of_turn_token_ids(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> list[int]:
    """Token ids that end an assistant turn under this template, to stop on besides ``tokenizer.eos_token_id``.

    Renders a one-exchange chat and reads the special token that follows the assistant's text; falls back to
    the known end-of-turn tokens the template mentions. May include the eos id itself; empty if none found.
    """
    template = get_chat_template(tokenizer, chat_template)
    if template is None:
        return []
    ids = _probe_end_of_turn(tokenizer, template)
    if not ids:
        ids = [tid for token in _KNOWN_END_OF_TURN if token in template
               for tid in [_special_token_id(tokenizer, token)] if tid is not None]
    return sorted(set(ids))


def _probe_end_of_turn(tokenizer: PreTrainedTokenizerBase, template: str) -> list[int]:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=False)
    except Exception:  # templates may raise on shapes they reject; fall back to the known tokens
        return []
    _, found, after = text.rpartition(_PROBE)
    if not found:
        return []
    after_ids = tokenizer.encode(after.lstrip(" "), add_special_tokens=False)
    special_ids = set(tokenizer.all_special_ids) | {
        tid for tid, token in tokenizer.added_tokens_decoder.items() if token.special}
    # Only the first token counts: later ones (e.g. a newline) belong to the next turn.
    return [after_ids[0]] if after_ids and after_ids[0] in special_ids else []


def _special_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        return None
    return int(tid)
