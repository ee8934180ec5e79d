"""The grammar libraries behind structured outputs: xgrammar (the default) and llguidance ("guidance").

Each backend turns one request's constraint into a compiled grammar once (``compile``, cached by the
manager) and a compiled grammar into a per-request matcher (``Grammar``). Both libraries fill the same
token bitmask: int32 words, bit ``t % 32`` of word ``t // 32`` set when token ``t`` is allowed.

``check_syntax`` needs no tokenizer: the engine front calls it so that a bad schema, regex or grammar is a
ValueError (a 400 on the server) before the request reaches the engine core.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Any, Protocol

from sluice.sampling_params import StructuredOutputsParams

_XGRAMMAR_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # "[01:10:15] /project/cpp/x.cc:94: " prefixes


class Grammar(Protocol):
    """One request's matcher: where its output stands in the grammar.

    ``accept_token`` of a token outside the grammar returns False and leaves the matcher as it was;
    ``rollback(n)`` undoes the last n accepted tokens (speculative decoding walks a request's proposals and
    back: xgrammar's over a terminating stop token too, llguidance's proposals stop short of one);
    ``fill_bitmask`` needs a matcher that is not terminated."""

    def accept_token(self, token_id: int) -> bool: ...
    def fill_bitmask(self, bitmask: Any, row: int) -> None: ...
    def is_terminated(self) -> bool: ...
    def rollback(self, num_tokens: int) -> None: ...
    def num_valid_tokens(self, token_ids: list[int]) -> int:
        """How many leading ``token_ids`` the grammar accepts in turn from here; the matcher is left as it was."""


def grammar_vocab_size(tokenizer: Any, model_vocab_size: int) -> int:
    """The token ids a grammar decides over: the tokenizer's (its vocabulary and added tokens), at most the
    model's. An embedding padded past the tokenizer (a vocabulary rounded up to a multiple of 64 or 128, or a
    small tokenizer on a large model) adds ids no text maps to; the grammar libraries would carry each as a
    special token and check it on every fill and accept (with 128k of them a row costs ~14x more), so they are
    left out of the grammar and masked at once when the bitmask is applied."""
    num_ids = len(tokenizer)
    vocab = tokenizer.get_vocab()
    if vocab:
        num_ids = max(num_ids, max(vocab.values()) + 1)
    return min(num_ids, model_vocab_size)


def spec_of(params: StructuredOutputsParams) -> tuple[str, str]:
    """(kind, spec text): the cache key of the constraint; JSON schemas as sorted, compact JSON text."""
    kind = params.kind
    if kind == "json":
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema object")
        return kind, json.dumps(schema, sort_keys=True, separators=(",", ":"))
    if kind == "choice":
        return kind, json.dumps(params.choice)
    if kind == "json_object":
        return kind, ""
    return kind, getattr(params, kind)


def _choice_regex(choices: list[str]) -> str:
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def _clean(error: BaseException) -> str:
    return _XGRAMMAR_LOCATION.sub("", str(error).strip())


_KIND_NAMES = {"json": "invalid JSON schema", "regex": "invalid regex", "grammar": "grammar syntax error",
               "choice": "invalid choice", "structural_tag": "invalid structural tag", "json_object": "invalid"}


def _error(kind: str, detail: str) -> ValueError:
    return ValueError(f"structured_outputs.{kind}: {_KIND_NAMES[kind]}: {detail}")


# ---- xgrammar ---------------------------------------------------------------------------------------

def _xgrammar_grammar(kind: str, spec: str, any_whitespace: bool) -> Any:
    """The xgrammar Grammar of a constraint (no tokenizer needed): parses, so it raises on bad syntax."""
    import xgrammar as xgr
    if kind == "json":
        return xgr.Grammar.from_json_schema(spec, any_whitespace=any_whitespace)
    if kind == "json_object":
        return xgr.Grammar.builtin_json_grammar()
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    if kind == "choice":
        return xgr.Grammar.from_regex(_choice_regex(json.loads(spec)))
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(spec)
    return xgr.Grammar.from_structural_tag(spec)


class XgrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar as xgr
        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # The manager's thread pool compiles one grammar per thread; xgrammar's own threads stay few.
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=2)

    @staticmethod
    def check_syntax(kind: str, spec: str, any_whitespace: bool) -> None:
        try:
            _xgrammar_grammar(kind, spec, any_whitespace)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError for every parse error
            raise _error(kind, _clean(e)) from None

    def compile(self, kind: str, spec: str, any_whitespace: bool) -> Any:
        try:
            return self.compiler.compile_grammar(_xgrammar_grammar(kind, spec, any_whitespace))
        except Exception as e:  # noqa: BLE001
            raise _error(kind, _clean(e)) from None

    def matcher(self, compiled: Any) -> "XgrammarGrammar":
        return XgrammarGrammar(compiled)


class XgrammarGrammar:
    __slots__ = ("_matcher",)

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr
        self._matcher = xgr.GrammarMatcher(compiled)

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    def num_valid_tokens(self, token_ids: list[int]) -> int:
        matcher, num_valid = self._matcher, 0
        for token_id in token_ids:
            if not matcher.accept_token(token_id):
                break
            num_valid += 1
        matcher.rollback(num_valid)
        return num_valid

    @staticmethod
    def fill_rows(bitmask: Any, grammars: "list[XgrammarGrammar]", rows: list[int], num_threads: int) -> None:
        """grammars[i]'s mask into row rows[i], in one call: xgrammar's batch fill loops in C++ (2-2.5x the
        row-by-row calls from Python on one thread) and spreads the rows over its own threads."""
        _xgrammar_batch(num_threads).batch_fill_next_token_bitmask([g._matcher for g in grammars], bitmask, rows)


@functools.cache
def _xgrammar_batch(num_threads: int) -> Any:
    import xgrammar as xgr
    return xgr.BatchGrammarMatcher(max_threads=num_threads)


# ---- llguidance ---------------------------------------------------------------------------------------

def _guidance_grammar(kind: str, spec: str, any_whitespace: bool) -> str:
    import llguidance
    if kind == "json":
        schema = json.loads(spec)
        if not any_whitespace and isinstance(schema, dict):
            schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}')
    if kind == "choice":
        return llguidance.grammar_from("regex", _choice_regex(json.loads(spec)))
    if kind == "grammar":
        return llguidance.grammar_from("grammar", spec)
    if kind == "regex":
        return llguidance.grammar_from("regex", spec)
    raise ValueError("structured_outputs.structural_tag: the guidance backend does not support structural tags")


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import llguidance.hf
        self.vocab_size = vocab_size
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.stop_token_ids = frozenset([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])

    @staticmethod
    def check_syntax(kind: str, spec: str, any_whitespace: bool) -> str:
        """Returns the guidance grammar text; raises ValueError naming the problem."""
        import llguidance
        try:
            grammar = _guidance_grammar(kind, spec, any_whitespace)
        except ValueError as e:
            if str(e).startswith("structured_outputs."):
                raise
            raise _error(kind, str(e)) from None
        problem = llguidance.LLMatcher.validate_grammar(grammar)
        if problem:
            raise _error(kind, problem.strip().splitlines()[0])
        return grammar

    def compile(self, kind: str, spec: str, any_whitespace: bool) -> str:
        return self.check_syntax(kind, spec, any_whitespace)

    def matcher(self, compiled: str) -> "GuidanceGrammar":
        return GuidanceGrammar(self.ll_tokenizer, compiled, self.stop_token_ids)


class GuidanceGrammar:
    """llguidance stops as soon as the grammar can take nothing more (``}`` of a JSON object) and then allows
    only eos; like xgrammar's, this matcher is terminated once it has taken that eos, so the request ends on a
    stop token and the text keeps its last character. A token outside the grammar is refused without putting
    the matcher in its (sticky) error state."""
    __slots__ = ("_matcher", "_stop_token_ids", "_tokens")

    def __init__(self, ll_tokenizer: Any, grammar: str, stop_token_ids: frozenset[int]) -> None:
        import llguidance
        self._matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        if self._matcher.is_error():
            raise ValueError(f"structured_outputs: {self._matcher.get_error()}")
        self._stop_token_ids = stop_token_ids
        self._tokens: list[int] = []  # accepted so far: is_terminated reads the last one, after rollbacks too

    def accept_token(self, token_id: int) -> bool:
        matcher = self._matcher
        if matcher.is_stopped():  # only a stop token is left, which llguidance takes with consume_token alone
            accepted = token_id in self._stop_token_ids and matcher.consume_token(token_id)
        else:
            accepted = matcher.try_consume_tokens([token_id]) == 1
        if accepted:
            self._tokens.append(token_id)
        return accepted

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        import llguidance.torch
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_stopped() and bool(self._tokens) and self._tokens[-1] in self._stop_token_ids

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)
        del self._tokens[len(self._tokens) - num_tokens:]

    def num_valid_tokens(self, token_ids: list[int]) -> int:
        # Up to the first stop token, not over it: llguidance counts a stop token only before it has stopped.
        stops = [i for i, t in enumerate(token_ids) if t in self._stop_token_ids]
        return self._matcher.validate_tokens(token_ids[:stops[0]] if stops else token_ids)

    @staticmethod
    def fill_rows(bitmask: Any, grammars: "list[GuidanceGrammar]", rows: list[int], num_threads: int) -> None:
        """grammars[i]'s mask into row rows[i]: on several threads llguidance's parallel fill (in Rust, without
        the GIL), else row by row (its parallel fill on one thread costs more than the calls it saves)."""
        if num_threads <= 1:
            for grammar, row in zip(grammars, rows):
                grammar.fill_bitmask(bitmask, row)
            return
        import llguidance.torch
        llguidance.torch.fill_next_token_bitmask_par(_guidance_executor(num_threads),
                                                     [(g._matcher, row) for g, row in zip(grammars, rows)], bitmask)


@functools.cache
def _guidance_executor(num_threads: int) -> Any:
    import llguidance
    return llguidance.LLExecutor(num_threads)


def fill_rows(bitmask: Any, grammars: list[Grammar], rows: list[int], num_threads: int = 1) -> None:
    """grammars[i]'s mask into row rows[i] of ``bitmask`` (int32, on the CPU, contiguous): one batch call per
    grammar library, on up to ``num_threads`` of its own threads; any other Grammar row by row. Python threads
    do not help: two of them filling disjoint rows took longer than one, with either library, at 320 and 49,152
    tokens."""
    first = type(grammars[0]) if grammars else None
    if first is not None and hasattr(first, "fill_rows") and all(type(g) is first for g in grammars):
        first.fill_rows(bitmask, grammars, rows, num_threads)  # one library (the usual case)
        return
    groups: dict[type, tuple[list[Grammar], list[int]]] = {}
    for grammar, row in zip(grammars, rows):
        group = groups.setdefault(type(grammar), ([], []))
        group[0].append(grammar)
        group[1].append(row)
    for cls, (group_grammars, group_rows) in groups.items():
        batch = getattr(cls, "fill_rows", None)
        if batch is not None:
            batch(bitmask, group_grammars, group_rows, num_threads)
        else:
            for grammar, row in zip(group_grammars, group_rows):
                grammar.fill_bitmask(bitmask, row)


BACKENDS = {"xgrammar": XgrammarBackend, "guidance": GuidanceBackend}


def resolve_backend(params: StructuredOutputsParams, engine_backend: str) -> str:
    """Checks the constraint's syntax and returns the backend that will compile it ("xgrammar" or
    "guidance"). ``auto`` takes xgrammar, and llguidance for what xgrammar refuses. Raises ValueError
    naming the problem (invalid JSON schema, bad regex, grammar syntax error). A constraint checked before
    is answered from a cache (parsing a JSON schema took ~0.3 ms per request; a workload repeats its schemas)."""
    kind, spec = spec_of(params)
    return _checked_backend(params.backend or engine_backend, kind, spec, not params.disable_any_whitespace)


@functools.lru_cache(maxsize=1024)  # errors are not cached: a bad constraint is checked again each time
def _checked_backend(backend: str, kind: str, spec: str, any_whitespace: bool) -> str:
    if backend == "guidance":
        GuidanceBackend.check_syntax(kind, spec, any_whitespace)
        return "guidance"
    try:
        XgrammarBackend.check_syntax(kind, spec, any_whitespace)
        return "xgrammar"
    except ValueError as xgrammar_error:
        if backend != "auto" or kind == "structural_tag":
            raise
        try:
            GuidanceBackend.check_syntax(kind, spec, any_whitespace)
        except ValueError:
            raise xgrammar_error from None
        return "guidance"
