"""The model runner's pooling hook: pooled hidden states instead of samples, and the decoder it pools.

A pooling engine's requests are prompt-only: the scheduler runs each prompt (in chunks, with
prefix-cache hits) like any other, and the step that computes a prompt's last token is where a
generation request would sample. There ``Pooler.pool`` takes that request's vector instead:

    LAST  hidden state of the prompt's last token      (the row the sampler would read)
    MEAN  running sum over every chunk / prompt length  (sums kept per InputBatch row across steps)
    CLS   hidden state of position 0                    (kept per row from the first chunk)

MEAN and CLS need every position to run, so their engines do not look up the prefix cache.
Normalization and ``dimensions`` are per request and happen in the front end (sluice/pooling/front.py).

``build_pooling_model`` builds the family's decoder without its LM head and loads both checkpoint
layouts: ``*ForCausalLM`` names (``model.layers.0...``, an ``lm_head`` to skip) and the bare ``*Model``
names sentence-transformers saves (``layers.0...``).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sluice.core.interface import SchedulerOutput
from sluice.pooling.config import PoolerConfig
from sluice.worker.input_batch import StepInputs


@dataclass(slots=True)
class PooledStep:
    """One step's pooled vectors, still on the device until ``to_host``."""
    req_ids: list[str]
    pooled: torch.Tensor  # float32 [len(req_ids), hidden]

    def to_host(self) -> dict[str, bytes]:
        """req_id -> float32 little-endian bytes (what EngineCoreOutput carries, and base64 encodes)."""
        rows = self.pooled.cpu().numpy().astype("<f4", copy=False)
        return {req_id: rows[i].tobytes() for i, req_id in enumerate(self.req_ids)}


class Pooler:
    def __init__(self, config: PoolerConfig, max_num_seqs: int, device: torch.device) -> None:
        self.config = config
        self.device = device
        needs_rows = config.pooling_type in ("MEAN", "CLS")
        # Per InputBatch row: the running sum (MEAN) or position 0's hidden state (CLS), in float32.
        self._row_state = (torch.zeros(max_num_seqs, config.hidden_size, dtype=torch.float32, device=device)
                           if needs_rows else None)

    def pool(self, scheduler_output: SchedulerOutput, inputs: StepInputs, hidden: torch.Tensor,
             new_rows: dict[str, int]) -> PooledStep | None:
        """Folds this step's hidden states in; returns the vectors of the requests whose prompt it completed.
        ``new_rows``: the batch row of each request admitted (or resumed) this step."""
        num_tokens = len(inputs.input_ids)
        hidden = hidden[:num_tokens]  # a CUDA graph's output is padded
        if self._row_state is not None:
            self._accumulate(scheduler_output, inputs, hidden, new_rows)
        if not inputs.sampling_req_ids:
            return None
        if self.config.pooling_type == "LAST":
            pooled = hidden[self._to_device(inputs.logits_indices)].float()
        else:
            pooled = self._row_state[self._to_device(inputs.sampling_rows)]  # advanced indexing: a copy
            if self.config.pooling_type == "MEAN":
                done = np.isin(inputs.rows, inputs.sampling_rows)
                lengths = torch.from_numpy(inputs.seq_lens[done].astype(np.float32)).to(self.device)
                pooled = pooled / lengths[:, None]
        return PooledStep(list(inputs.sampling_req_ids), pooled)

    def _accumulate(self, scheduler_output: SchedulerOutput, inputs: StepInputs, hidden: torch.Tensor,
                    new_rows_of: dict[str, int]) -> None:
        new_rows = []
        for new in scheduler_output.scheduled_new_reqs:  # admitted, or resumed after a preemption
            if new.num_computed_tokens:
                raise RuntimeError(f"{self.config.pooling_type} pooling needs every prompt position, but request "
                                   f"{new.req_id!r} starts at position {new.num_computed_tokens} (a prefix-cache hit)")
            new_rows.append(new_rows_of[new.req_id])
        if new_rows:
            self._row_state[self._to_device(np.asarray(new_rows, dtype=np.int64))] = 0.0
        num_scheduled = np.diff(inputs.query_start_loc)
        token_rows = np.repeat(inputs.rows, num_scheduled)
        if self.config.pooling_type == "MEAN":
            self._row_state.index_add_(0, self._to_device(token_rows), hidden.float())
        else:
            first = np.flatnonzero(inputs.positions == 0)
            if len(first):
                self._row_state[self._to_device(token_rows[first])] = hidden[self._to_device(first)].float()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(self.device)


# ---- the model -------------------------------------------------------------------------------------------
def decoder_class(hf_config: Any) -> type:
    """The causal-LM class whose decoder a pooling model runs: ``Qwen3Model`` (how sentence-transformers
    saves a decoder) runs as ``Qwen3ForCausalLM`` without its head."""
    from sluice.models.registry import get_model_class, resolve_model_class, supported_architectures

    for architecture in getattr(hf_config, "architectures", None) or []:
        causal = architecture.removesuffix("Model") + "ForCausalLM"
        if architecture.endswith("Model") and causal in supported_architectures():
            return resolve_model_class(causal)
    return get_model_class(hf_config)


def decoder_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors under the causal LM's names, the LM head left out."""
    for name, tensor in weights:
        if name.startswith("lm_head."):
            continue
        yield (name if name.startswith("model.") else "model." + name), tensor


def build_pooling_model(hf_config: Any, dtype: torch.dtype, device: torch.device | str, attn_backend: Any,
                        weights: Iterable[tuple[str, torch.Tensor]] | None = None, load_format: str = "auto",
                        seed: int = 0) -> torch.nn.Module:
    """The decoder of ``hf_config``'s family with ``lm_head`` removed (it is built, then dropped: an
    untied head costs its memory only until then), weights loaded (or dummy ones), in eval mode."""
    from sluice.models.loader import initialize_dummy_weights

    model = decoder_class(hf_config)(hf_config, dtype, torch.device(device), attn_backend)
    model.lm_head = None  # a pooling model never computes logits
    if load_format == "dummy":
        initialize_dummy_weights(model, seed)
    elif weights is None:
        raise ValueError(f"load_format {load_format!r} needs a weights iterator (only 'dummy' loads without one)")
    else:
        model.load_weights(decoder_weights(weights))
    return model.eval()
