"""PoolingParams: the per-request knobs of an embedding request (vLLM's names), and their checks."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from sluice.pooling.config import PoolerConfig


@dataclass
class PoolingParams:
    """``dimensions``: keep the first d values of a Matryoshka embedding (renormalized when the model
    normalizes). ``normalize``: None follows the model's sentence-transformers config.
    ``truncate_prompt_tokens``: keep only the last k prompt tokens (-1: as many as max_model_len allows)."""
    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    task: str = "embed"

    def clone(self) -> "PoolingParams":
        return copy.copy(self)

    def verify(self, pooler_config: PoolerConfig, model_name: str) -> None:
        """Raises ValueError naming the field when the model cannot honour the request."""
        if self.task != "embed":
            raise ValueError(f"task must be 'embed', got {self.task!r}")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < -1:
            raise ValueError(f"truncate_prompt_tokens must be -1 or at least 1, got {self.truncate_prompt_tokens}")
        if self.truncate_prompt_tokens == 0:
            raise ValueError("truncate_prompt_tokens must be -1 or at least 1, got 0")
        if self.dimensions is None:
            return
        if not pooler_config.is_matryoshka:
            raise ValueError(f"dimensions: model {model_name!r} does not support Matryoshka representations "
                             "(its config sets neither is_matryoshka nor matryoshka_dimensions): truncated "
                             "embeddings would be poor, so only its full size is served")
        allowed = pooler_config.matryoshka_dimensions
        if allowed is not None and self.dimensions not in allowed:
            raise ValueError(f"dimensions: model {model_name!r} supports only {list(allowed)}, got {self.dimensions}")
        if not 1 <= self.dimensions <= pooler_config.hidden_size:
            raise ValueError(f"dimensions must be between 1 and {pooler_config.hidden_size}, got {self.dimensions}")
