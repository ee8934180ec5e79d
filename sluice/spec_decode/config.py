"""``--speculative-config``: what proposes tokens, and how many, resolved once at start-up.

vLLM's JSON, for example::

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    {"model": "/path/to/small-model", "num_speculative_tokens": 3}     (method "draft_model")
    {"method": "eagle", "model": "/path/to/eagle-head", "num_speculative_tokens": 3}   (eagle.py)
    {"method": "eagle3", "model": "/path/to/eagle3-head", "num_speculative_tokens": 3} (eagle3.py)
    ... "disable_by_batch_size": 32                                     (no proposals while 32+ requests run)

A bad config (unknown method or key, fewer than one token, a draft model of another vocabulary, an EAGLE head
of another width, EAGLE-3 layer ids the target lacks) is a ValueError naming the key, raised by
``create_engine_config`` before the engine starts. Checks that need an EAGLE-3 head's tensors (fc's width, d2t)
run when the head loads, also before the engine serves.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model", "eagle", "eagle3")
_KEYS = {"method", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
         "disable_by_batch_size"}


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str  # ngram | draft_model | eagle | eagle3
    num_speculative_tokens: int
    prompt_lookup_min: int = 1  # ngram
    prompt_lookup_max: int = 4  # ngram
    model: str | None = None  # draft_model, eagle, eagle3: an HF folder with the target's vocabulary
    draft_hf_config: Any = None  # draft_model, eagle, eagle3: its config, read once here
    aux_hidden_state_layer_ids: tuple[int, ...] = ()  # eagle3: the target layers whose inputs its fc reads
    disable_by_batch_size: int | None = None  # no proposals while this many requests or more run

    def allows_proposals(self, num_running: int) -> bool:
        """``disable_by_batch_size``: no proposals while that many requests or more run."""
        return self.disable_by_batch_size is None or num_running < self.disable_by_batch_size

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots a request needs beyond the step's tokens: a draft model writes its proposals' KV."""
        return self.num_speculative_tokens if self.method in ("draft_model", "eagle", "eagle3") else 0


def parse_speculative_config(value: str | dict | None, target_vocab_size: int, load_format: str = "auto",
                             target_hf_config: Any = None) -> SpeculativeConfig | None:
    """The JSON string or dict of ``speculative_config``, checked against the target's config; None when absent."""
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
    target_hidden_size = getattr(target_hf_config, "hidden_size", None)
    if method == "eagle" and target_hidden_size is not None and hf_config.hidden_size != target_hidden_size:
        raise ValueError(f"speculative_config.model {model!r}: an EAGLE head of hidden_size {hf_config.hidden_size} "
                         f"does not fit a target of hidden_size {target_hidden_size}")
    aux_layer_ids = _eagle3_aux_layer_ids(model, hf_config, target_hf_config) if method == "eagle3" else ()
    return SpeculativeConfig(method, k, model=path, draft_hf_config=hf_config, disable_by_batch_size=disable,
                             aux_hidden_state_layer_ids=aux_layer_ids)


def _eagle3_aux_layer_ids(model: str, hf_config: Any, target_hf_config: Any) -> tuple[int, ...]:
    """Checks an EAGLE-3 head's config against the target's; returns the target layers its fc reads.

    The head's config may name them (``eagle_aux_hidden_state_layer_ids``, at the top or in ``eagle_config``);
    vLLM's default is (2, L // 2, L - 3) for a target of L layers. Layer i's aux state is its input."""
    name = f"speculative_config.model {model!r}"
    if hf_config.num_hidden_layers != 1:
        raise ValueError(f"{name}: an EAGLE-3 head has one decoder layer, this one {hf_config.num_hidden_layers}")
    reads = getattr(hf_config, "target_hidden_size", None) or hf_config.hidden_size
    if reads != target_hf_config.hidden_size:
        raise ValueError(f"{name}: an EAGLE-3 head of hidden_size {hf_config.hidden_size} (target_hidden_size "
                         f"{getattr(hf_config, 'target_hidden_size', None)}) reads hidden states of size {reads}; "
                         f"the target's hidden_size is {target_hf_config.hidden_size}")
    draft_vocab = getattr(hf_config, "draft_vocab_size", None) or hf_config.vocab_size
    if not 1 <= draft_vocab <= hf_config.vocab_size:
        raise ValueError(f"{name}: draft_vocab_size {draft_vocab} must be between 1 and vocab_size "
                         f"{hf_config.vocab_size}")
    eagle_config = getattr(hf_config, "eagle_config", None) or {}
    layer_ids = (getattr(hf_config, "eagle_aux_hidden_state_layer_ids", None)
                 or eagle_config.get("eagle_aux_hidden_state_layer_ids"))
    num_layers = target_hf_config.num_hidden_layers
    if not layer_ids:
        layer_ids = (2, num_layers // 2, num_layers - 3)
    if not all(isinstance(i, int) and 0 <= i < num_layers for i in layer_ids):
        raise ValueError(f"{name}: eagle_aux_hidden_state_layer_ids {list(layer_ids)} out of range for a target "
                         f"of {num_layers} layers (0..{num_layers - 1}; the default is 2, L // 2, L - 3)")
    return tuple(layer_ids)
