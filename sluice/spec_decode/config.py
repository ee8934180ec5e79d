"""``--speculative-config``: what proposes tokens, and how many, resolved once at start-up.

vLLM's JSON, for example::

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    {"model": "/path/to/small-model", "num_speculative_tokens": 3}     (method "draft_model")
    {"method": "eagle", "model": "/path/to/eagle-head", "num_speculative_tokens": 3}   (eagle.py)
    ... "disable_by_batch_size": 32                                     (no proposals while 32+ requests run)

A bad config (unknown method or key, fewer than one token, a draft model of another vocabulary) is a
ValueError naming the key, raised by ``create_engine_config`` before the engine starts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model", "eagle")
_KEYS = {"method", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
         "disable_by_batch_size"}


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str  # ngram | draft_model | eagle
    num_speculative_tokens: int
    prompt_lookup_min: int = 1  # ngram
    prompt_lookup_max: int = 4  # ngram
    model: str | None = None  # draft_model, eagle: an HF folder with the target's vocabulary
    draft_hf_config: Any = None  # draft_model, eagle: its config, read once here
    disable_by_batch_size: int | None = None  # no proposals while this many requests or more run

    def allows_proposals(self, num_running: int) -> bool:
        """``disable_by_batch_size``: no proposals while that many requests or more run."""
        return self.disable_by_batch_size is None or num_running < self.disable_by_batch_size

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots a request needs beyond the step's tokens: a draft model writes its proposals' KV."""
        return self.num_speculative_tokens if self.method in ("draft_model", "eagle") else 0


def parse_speculative_config(value: str | dict | None, target_vocab_size: int, load_format: str = "auto",
                             target_hidden_size: int | None = None) -> SpeculativeConfig | None:
    """The JSON string or dict of ``speculative_config``, checked; None when absent."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config must be a JSON object, got {value!r} ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
    unknown = sorted(set(value) - _KEYS)
    if unknown:
        raise ValueError(f"speculative_config: unknown keys {unknown}; known: {sorted(_KEYS)}")
    method = value.get("method") or ("draft_model" if value.get("model") else None)
    if method == "eagle3":
        raise ValueError("speculative_config.method eagle3 is not supported yet (its head reads three of the target's "
                         "layers and maps a draft vocabulary); use eagle, draft_model or ngram")
    if method not in METHODS:
        raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)} (or give a draft "
                         f"\"model\"), got {value.get('method')!r}")
    k = value.get("num_speculative_tokens")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"speculative_config.num_speculative_tokens must be an integer of at least 1, got {k!r}")
    disable = value.get("disable_by_batch_size")
    if disable is not None and (not isinstance(disable, int) or disable < 1):
        raise ValueError(f"speculative_config.disable_by_batch_size must be an integer of at least 1, got {disable!r}")
    if method == "ngram":
        lo, hi = value.get("prompt_lookup_min", 1), value.get("prompt_lookup_max", 4)
        if "prompt_lookup_min" in value and "prompt_lookup_max" not in value:
            hi = max(hi, lo)
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError("speculative_config: prompt_lookup_min and prompt_lookup_max must satisfy "
                             f"1 <= min <= max, got {lo!r} and {hi!r}")
        if value.get("model"):
            raise ValueError("speculative_config: method ngram takes no model")
        return SpeculativeConfig("ngram", k, lo, hi, disable_by_batch_size=disable)
    model = value.get("model")
    if not model:
        raise ValueError(f"speculative_config: method {method} needs a \"model\" (an HF folder)")
    from sluice.models.model_config import read_checkpoint
    path, hf_config, _ = read_checkpoint(model, load_format)
    if hf_config.vocab_size != target_vocab_size:
        raise ValueError(f"speculative_config.model {model!r} has vocab_size {hf_config.vocab_size}, the target "
                         f"model {target_vocab_size}: a draft model must share the target's vocabulary")
    if method == "eagle" and target_hidden_size is not None and hf_config.hidden_size != target_hidden_size:
        raise ValueError(f"speculative_config.model {model!r}: an EAGLE head of hidden_size {hf_config.hidden_size} "
                         f"does not fit a target of hidden_size {target_hidden_size}")
    return SpeculativeConfig(method, k, model=path, draft_hf_config=hf_config, disable_by_batch_size=disable)
