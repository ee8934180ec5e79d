"""SamplingParams: how one request is sampled and when it stops (vLLM's field names).

Validation happens at construction, so a bad value fails before it reaches the
engine, with a ValueError that names the field. Checks that need the model or the
engine's limits (vocab size, ``max_logprobs``) are methods the engine front calls:
``verify_against_vocab``, ``verify_max_logprobs``; ``update_bad_words_from_tokenizer``
turns ``bad_words`` into the token id sequences the sampler bans.
"""
from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any

_SAMPLING_EPS = 1e-5
_MAX_LOGIT_BIAS = 100.0  # OpenAI's range: biases are clamped to [-100, 100]


STRUCTURED_OUTPUT_BACKENDS = ("auto", "xgrammar", "guidance")
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """One constraint on a request's output (vLLM's names); exactly one of the constraint fields is set.

    ``json``: a JSON schema (dict or JSON text); ``regex``; ``choice``: the output is one of these strings;
    ``grammar``: EBNF/GBNF (xgrammar) or Lark (guidance); ``json_object``: any JSON object;
    ``structural_tag``: xgrammar's structural tag (JSON text). ``backend`` overrides the engine's
    ``structured_outputs_backend`` for this request. The grammar compiles in the engine core
    (sluice/structured_output/); the engine front checks its syntax first (a ValueError naming the problem).
    """
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    backend: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs: exactly one of {', '.join(_CONSTRAINTS)} must be set, got "
                             f"{', '.join(given) if given else 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (dict or JSON text), got "
                             f"{type(self.json).__name__}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            self.choice = list(self.choice)
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.backend is not None and self.backend not in STRUCTURED_OUTPUT_BACKENDS:
            raise ValueError(f"structured_outputs backend must be one of {', '.join(STRUCTURED_OUTPUT_BACKENDS)}, "
                             f"got {self.backend!r}")

    @property
    def kind(self) -> str:
        """The one constraint field that is set."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output carries the whole text so far
    DELTA = 1  # every output carries only what is new
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # HF semantics over prompt + generated tokens; 1 disables
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    allowed_token_ids: list[int] | None = None  # when set, every other token is masked
    bad_words: list[str] | None = None  # words never generated (multi-token aware)
    logprobs: int | None = None  # top logprobs per generated token (0: the sampled one only)
    prompt_logprobs: int | None = None  # top logprobs per prompt position
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding (sluice/structured_output/)
    # Filled by the engine front from bad_words (update_bad_words_from_tokenizer).
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)
    # Filled by the engine front: token ids that end generation besides eos (e.g. a chat
    # template's end-of-turn token).
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if self.logit_bias is not None:
            self.logit_bias = _normalize_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif self.bad_words is not None:
            self.bad_words = list(self.bad_words)
        self._verify()
        self._verify_penalties_and_logprobs()
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        def bad(field_name: str, why: str) -> None:
            raise ValueError(f"{field_name} {why}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0.0:
            bad("temperature", f"must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"must be -1 (disable) or at least 1, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            bad("min_tokens", f"must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be at most max_tokens={self.max_tokens}, got {self.min_tokens}")
        if any(not s for s in self.stop):
            bad("stop", "cannot contain an empty string")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs", f"must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}")

    def _verify_penalties_and_logprobs(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty")
            if any(not _is_int(t) or t < 0 for t in self.allowed_token_ids):
                raise ValueError("allowed_token_ids must be non-negative integers")
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise ValueError("bad_words must be non-empty strings")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {value!r}")

    def verify(self) -> None:
        """Checks every field again (the params may have been changed since construction)."""
        self._verify()
        self._verify_penalties_and_logprobs()

    def verify_max_logprobs(self, max_logprobs: int) -> None:
        """Raises when logprobs or prompt_logprobs ask for more than the engine's cap."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > max_logprobs:
                raise ValueError(f"{name}={value} exceeds the maximum allowed value max_logprobs={max_logprobs}")

    def verify_against_vocab(self, vocab_size: int) -> None:
        """Raises when a token id in logit_bias, allowed_token_ids or bad_words is outside the vocab."""
        checks = {
            "logit_bias": list(self.logit_bias or ()),
            "allowed_token_ids": self.allowed_token_ids or [],
            "bad_words": [t for ids in self._bad_words_token_ids or [] for t in ids],
        }
        for name, token_ids in checks.items():
            bad = [t for t in token_ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{name} contains token id {bad[0]}, outside the vocab of size {vocab_size}")

    def update_bad_words_from_tokenizer(self, tokenizer: Any) -> None:
        """Encodes bad_words into token id sequences, as vLLM does.

        Each word is encoded as-is and with a leading space, so that it is banned both at
        the start of the text and mid-text; the spaced form is kept only when it is a
        different first token of the same length (otherwise it adds nothing).
        """
        if not self.bad_words:
            return
        sequences: list[list[int]] = []
        for word in self.bad_words:
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            sequences.append(plain)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                sequences.append(spaced)
        self._bad_words_token_ids = sequences

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        """Token id sequences to ban; None until update_bad_words_from_tokenizer ran."""
        return self._bad_words_token_ids

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def uses_per_step_state(self) -> bool:
        """Whether sampling reads the request's earlier output tokens (penalties, bad words, min_tokens)."""
        return bool(self.uses_penalties or self._bad_words_token_ids or self.bad_words or self.min_tokens > 0)

    @property
    def reads_output_text_on_host(self) -> bool:
        """Whether sampling must see the actual earlier output token ids on the host (bad words match
        sequences); penalties and min_tokens need only counts, which the runner completes on the device."""
        return bool(self._bad_words_token_ids or self.bad_words)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids

    def update_from_tokenizer(self, eos_token_id: int | None, extra_stop_ids: list[int]) -> None:
        """Adds the model's other end-of-generation ids (e.g. a chat template's end-of-turn token).

        eos itself is checked by the scheduler. Under ``ignore_eos`` these ids are ignored too, as vLLM
        does: only explicit ``stop_token_ids`` still stop the request.
        """
        extra = () if self.ignore_eos else extra_stop_ids
        self._all_stop_token_ids = set(self.stop_token_ids) | set(extra)

    def clone(self) -> "SamplingParams":
        """An independent copy: scalars are shared, containers and nested params copied (a deepcopy of
        every field costs ~100 calls per request, paid twice per request on the way in)."""
        new = copy.copy(self)
        for name, value in vars(self).items():
            if value is not None and not isinstance(value, (int, float, str, enum.Enum)):
                setattr(new, name, copy.deepcopy(value))
        return new


class ContextLengthError(ValueError):
    """A request that cannot fit max_model_len; ``param`` names the request field to blame."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """The one context-length rule (LLMEngine and the server): the prompt must leave room for one output
    token, and prompt + max_tokens must fit ``max_model_len`` (the engine's, capped by its KV cache).
    Returns the max_tokens to run with (the rest of the context when None); raises ContextLengthError."""
    if num_prompt_tokens >= max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length (max_model_len) is {max_model_len} tokens. However, your prompt "
            f"is {num_prompt_tokens} tokens, which leaves no room for the completion. Please reduce the length of "
            "the prompt.", "prompt")
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length (max_model_len) is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} in the "
            "completion). Please reduce the length of the prompt or max_tokens.", "max_tokens")
    return max_tokens


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalize_logit_bias(logit_bias: dict) -> dict[int, float]:
    """Int keys (JSON sends strings), float values clamped to [-100, 100]."""
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(logit_bias).__name__}")
    normalized: dict[int, float] = {}
    for token_id, bias in logit_bias.items():
        try:
            key = int(token_id)
            value = float(bias)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must map integer token ids to numbers, got {token_id!r}: {bias!r}") from None
        if key < 0:
            raise ValueError(f"logit_bias contains negative token id {key}")
        normalized[key] = min(max(value, -_MAX_LOGIT_BIAS), _MAX_LOGIT_BIAS)
    return normalized


@dataclass
class BeamSearchParams:
    """Parameters of ``LLM.beam_search`` (vLLM's names; see sluice/beam_search.py for the semantics).

    ``length_penalty`` is HF's: a finished beam scores ``cum_logprob / num_generated ** length_penalty``.
    ``temperature`` is accepted for vLLM compatibility; candidates are ranked by the model's raw
    logprobs, so it does not change the result.
    """
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature!r}")
        if not isinstance(self.length_penalty, (int, float)) or not _is_finite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")


def _is_finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")
