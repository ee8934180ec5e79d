"""Request fields -> SamplingParams, with the server's caps and the explicit rejections.

Everything a client can ask for is either mapped onto SamplingParams, checked against a
cap (``--max-n``, ``--max-logprobs``, the context length), or rejected with a 400 that
says it is not supported. A parameter is never dropped silently: if SamplingParams does
not have a field yet (penalties, logit_bias, ...), asking for a non-default value is a 400.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sluice.entrypoints.openai.errors import OpenAIError, bad_request
from sluice.entrypoints.openai.protocol import ChatCompletionRequest, SamplingFields
from sluice.sampling_params import (STRUCTURED_OUTPUT_BACKENDS, ContextLengthError, RequestOutputKind, SamplingParams,
                                    StructuredOutputsParams)
from sluice.sampling_params import check_context_length as check_engine_context_length

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# request field -> (SamplingParams field, value that means "off"). Mapped only when the
# engine's SamplingParams has the field; otherwise a non-default value is rejected.
_OPTIONAL_FIELDS = {
    "presence_penalty": ("presence_penalty", 0.0),
    "frequency_penalty": ("frequency_penalty", 0.0),
    "repetition_penalty": ("repetition_penalty", 1.0),
    "logit_bias": ("logit_bias", None),
    "allowed_token_ids": ("allowed_token_ids", None),
    "bad_words": ("bad_words", None),
}


@dataclass(frozen=True, slots=True)
class ServingLimits:
    """Caps applied before a request reaches the engine (a huge value is a 400, never a 500).

    Each bounds work that happens before the engine can refuse the request: a prompt's text is checked
    against the most characters ``max_model_len`` tokens can spell before it is tokenized, and the lists
    the engine scans at every step or every detokenized character (stop strings, bad words, logit_bias)
    are capped, as OpenAI caps them, so one request cannot slow every stream."""

    max_model_len: int
    vocab_size: int
    max_n: int = 128
    max_logprobs: int = 20
    priority_scheduling: bool = False
    max_prompt_chars: int | None = None  # None: no check before tokenizing (prompt_chars_limit computes one)
    max_prompts: int = 256  # prompts in one completions request
    max_stop_strings: int = 64
    max_stop_string_chars: int = 1024
    max_bad_words: int = 256
    max_token_id_list: int = 1024  # logit_bias entries, stop_token_ids
    # --generation-config: defaults for sampling fields a request leaves out (temperature, top_p, top_k, min_p,
    # repetition_penalty), from the model's generation_config.json as vLLM takes them.
    sampling_defaults: dict[str, float] | None = None


GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_config_defaults(source: str, model_path: str) -> dict[str, float]:
    """vLLM's --generation-config: "vllm" ignores the model's file; "auto" reads it from the model folder; any
    other value is a folder holding generation_config.json. Only the fields that differ from transformers'
    defaults count (as vLLM's to_diff_dict), so a file that merely restates them changes nothing."""
    import os
    folder = model_path if source == "auto" else source
    if source == "vllm" or not os.path.isfile(os.path.join(folder or "", "generation_config.json")):
        if source not in ("auto", "vllm"):
            raise ValueError(f"--generation-config: no generation_config.json in {source!r}")
        return {}
    from transformers import GenerationConfig
    diff = GenerationConfig.from_pretrained(folder).to_diff_dict()
    return {name: diff[name] for name in GENERATION_CONFIG_FIELDS if diff.get(name) is not None}


def prompt_chars_limit(max_model_len: int, vocab: Iterable[str]) -> int:
    """The most characters a prompt of ``max_model_len`` tokens can hold: no token spells more characters than
    its own vocabulary string has (byte-level BPE writes one character per byte; SentencePiece's word mark
    stands for one space), doubled for normalizers that fold two characters into one (NFKC)."""
    longest = max((len(token) for token in vocab), default=1)
    return 2 * max_model_len * max(longest, 1)


def check_prompt_chars(text: str, limits: ServingLimits, param: str = "prompt") -> None:
    """400 before tokenizing when the text cannot fit max_model_len tokens anyway."""
    if limits.max_prompt_chars is not None and len(text) > limits.max_prompt_chars:
        raise bad_request(f"the prompt is {len(text)} characters long, more than {limits.max_model_len} tokens "
                          f"(the maximum context length) can hold; please shorten it", param)


def _check_count(values: Any, cap: int, param: str, what: str) -> None:
    if values is not None and len(values) > cap:
        raise bad_request(f"{param} has {len(values)} {what}; at most {cap} are allowed", param)


def sampling_param_names() -> set[str]:
    return {f.name for f in dataclasses.fields(SamplingParams)}


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, limits: ServingLimits) -> int:
    """Returns the max_tokens to use; 400 when prompt + completion cannot fit max_model_len (the engine's rule)."""
    try:
        return check_engine_context_length(num_prompt_tokens, max_tokens, limits.max_model_len)
    except ContextLengthError as e:
        raise bad_request(str(e), e.param) from None


def check_common(request: SamplingFields, limits: ServingLimits) -> None:
    """Caps and rejections that do not depend on the prompt."""
    if not 1 <= request.n <= limits.max_n:
        raise bad_request(f"n must be between 1 and {limits.max_n} (--max-n), got {request.n}", "n")
    if request.seed is not None and not _INT64_MIN <= request.seed <= _INT64_MAX:
        raise bad_request(f"seed must fit in a signed 64-bit integer, got {request.seed}", "seed")
    if request.priority != 0 and not limits.priority_scheduling:
        raise bad_request(f"priority {request.priority} was given but the server schedules fcfs; start it "
                          "with --scheduling-policy priority", "priority")
    if not _INT64_MIN <= request.priority <= _INT64_MAX:
        raise bad_request("priority must fit in a signed 64-bit integer", "priority")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    _check_count(stop, limits.max_stop_strings, "stop", "strings")
    if any(len(text) > limits.max_stop_string_chars for text in stop or []):
        raise bad_request(f"stop strings may be at most {limits.max_stop_string_chars} characters long", "stop")
    _check_count(request.bad_words, limits.max_bad_words, "bad_words", "words")
    if any(len(word) > limits.max_stop_string_chars for word in request.bad_words or []):
        raise bad_request(f"bad words may be at most {limits.max_stop_string_chars} characters long", "bad_words")
    _check_count(request.logit_bias, limits.max_token_id_list, "logit_bias", "entries")
    _check_count(request.stop_token_ids, limits.max_token_id_list, "stop_token_ids", "token ids")
    _check_count(request.allowed_token_ids, limits.vocab_size, "allowed_token_ids", "token ids")
    if any(not 0 <= t < limits.vocab_size for t in request.stop_token_ids or []):
        raise bad_request(f"stop_token_ids must be token ids below the vocab size {limits.vocab_size}",
                          "stop_token_ids")
    known = sampling_param_names()
    for name, (param_name, off) in _OPTIONAL_FIELDS.items():
        value = getattr(request, name)
        if value is not None and value != off and param_name not in known:
            raise bad_request(f"{name} is not supported by this engine yet", name)


def check_chat_only(request: ChatCompletionRequest) -> None:
    """Chat features sluice cannot honour."""
    if any(m.name for m in request.messages):
        raise bad_request("messages[].name is not supported by sluice (the chat template cannot render it)",
                          "messages")


_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}
_BACKEND_ALIASES = {"llguidance": "guidance"}


def structured_outputs_params(request: SamplingFields) -> StructuredOutputsParams | None:
    """The request's constraint from response_format, structured_outputs or the guided_* fields (one of them);
    a 400 naming the field when it is malformed. Its syntax (schema, regex, grammar) is checked by the engine
    front when the request is added: a ValueError there is a 400 naming the problem too."""
    sources: list[tuple[str, dict[str, Any]]] = []
    if request.structured_outputs is not None:
        fields = request.structured_outputs.model_dump(exclude_none=True, by_alias=True)
        sources.append(("structured_outputs", fields))
    guided = {kind: value for name, kind in _GUIDED_FIELDS.items() if (value := getattr(request, name)) is not None}
    if guided:
        sources.append((next(n for n in _GUIDED_FIELDS if getattr(request, n) is not None), guided))
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            sources.append(("response_format", {"json_object": True}))
        else:
            schema = (response_format.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise bad_request("response_format.json_schema.schema must be a JSON schema object",
                                  "response_format")
            sources.append(("response_format", {"json": schema}))
    if len(sources) > 1:
        raise bad_request(f"give one constraint, not {' and '.join(name for name, _ in sources)}", sources[1][0])
    if not sources:
        return None
    param, fields = sources[0]
    if request.guided_decoding_backend is not None:
        backend = _BACKEND_ALIASES.get(request.guided_decoding_backend, request.guided_decoding_backend)
        if backend not in STRUCTURED_OUTPUT_BACKENDS:
            raise bad_request(f"guided_decoding_backend must be one of {', '.join(STRUCTURED_OUTPUT_BACKENDS)}, "
                              f"got {request.guided_decoding_backend!r}", "guided_decoding_backend")
        fields["backend"] = backend
    try:
        return StructuredOutputsParams(**fields)
    except (ValueError, TypeError) as e:
        raise bad_request(str(e), param) from None


def check_logprobs(num: int | None, limits: ServingLimits, param: str) -> None:
    if num is not None and not 0 <= num <= limits.max_logprobs:
        raise bad_request(f"{param} must be between 0 and {limits.max_logprobs} (--max-logprobs), got {num}", param)


def build_sampling_params(request: SamplingFields, *, max_tokens: int, logprobs: int | None,
                          prompt_logprobs: int | None, limits: ServingLimits) -> SamplingParams:
    """The SamplingParams for one prompt of ``request`` (after check_common)."""
    known = sampling_param_names()
    defaults = limits.sampling_defaults or {}

    def value_or_default(name: str, off: float) -> Any:
        value = getattr(request, name)
        return value if value is not None else defaults.get(name, off)

    top_k = value_or_default("top_k", -1)
    if top_k >= limits.vocab_size:
        top_k = -1  # keeping every token is what "no top-k" means
    kwargs: dict[str, Any] = dict(
        n=request.n,
        temperature=value_or_default("temperature", 1.0),
        top_p=value_or_default("top_p", 1.0),
        top_k=top_k,
        min_p=value_or_default("min_p", 0.0),
        seed=request.seed,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        stop=request.stop,
        stop_token_ids=request.stop_token_ids,
        ignore_eos=request.ignore_eos,
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens,
        spaces_between_special_tokens=request.spaces_between_special_tokens,
        output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
    )
    for name, (param_name, off) in _OPTIONAL_FIELDS.items():
        value = getattr(request, name)
        if value is None and name in defaults:
            value = defaults[name]
        if value is not None and value != off and param_name in known:
            kwargs[param_name] = value
    structured_outputs = structured_outputs_params(request)
    if structured_outputs is not None:
        kwargs["structured_outputs"] = structured_outputs
    for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if value is None:
            continue
        if name not in known:
            raise bad_request(f"{name} is not supported by this engine yet", name)
        kwargs[name] = value
    try:
        params = SamplingParams(**kwargs)  # logit_bias: SamplingParams' rule (int keys, values clamped to +-100)
        params.verify_against_vocab(limits.vocab_size)
    except (ValueError, TypeError) as e:
        raise OpenAIError(str(e), 400) from None
    return params
