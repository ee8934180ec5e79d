"""What LLM.embed / LLM.encode return, in vLLM's shapes.

    EmbeddingRequestOutput(request_id, outputs=EmbeddingOutput(embedding=[...]), prompt_token_ids, finished)
    PoolingRequestOutput(request_id, outputs=PoolingOutput(data=tensor), prompt_token_ids, finished)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

_O = TypeVar("_O")


@dataclass
class PoolingOutput:
    data: "object"  # torch.Tensor, float32 [dimensions]

    @classmethod
    def from_array(cls, vector: np.ndarray) -> "PoolingOutput":
        import torch
        return cls(torch.from_numpy(vector))


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)

    @classmethod
    def from_base(cls, output: PoolingOutput) -> "EmbeddingOutput":
        return cls(output.data.tolist())


@dataclass
class PoolingRequestOutput(Generic[_O]):
    request_id: str
    outputs: _O
    prompt_token_ids: list[int]
    finished: bool
    num_cached_tokens: int = 0
    # The embedding as a float32 array: the server base64-encodes its bytes as they are.
    vector: np.ndarray | None = None
    failed: bool = False  # the engine failed this request on its own: no vector


@dataclass
class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    @classmethod
    def from_base(cls, output: PoolingRequestOutput) -> "EmbeddingRequestOutput":
        return cls(output.request_id, EmbeddingOutput.from_base(output.outputs), output.prompt_token_ids,
                   output.finished, output.num_cached_tokens, output.vector, output.failed)
