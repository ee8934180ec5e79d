"""EAGLE proposals: a one-layer head that continues the *target's* hidden states (the EAGLE authors' layout).

Checkpoint (HF folder, safetensors or pytorch_model.bin; config.json a Llama config with num_hidden_layers 1):

    fc.weight [H, 2H] (+ fc.bias)      over [embed(token), target hidden]
    layers.0.self_attn.{q,k,v,o}_proj, layers.0.mlp.{gate,up,down}_proj, layers.0.post_attention_layernorm
                                        (layer 0 has no input_layernorm; there is no final norm)
    embed_tokens.weight                 optional: the target's embedding otherwise
    logits: the target's lm_head over the layer's output

Pair p of a request is (target hidden at position p, token p + 1); the head's KV for pair p sits in slot p of
the request's blocks, in a cache of its own under the target's block ids (as draft_model.py). After each step,
once the verified tokens are known:

    request with k proposals, j kept:   target hidden h_s .. h_{s+j} (its positions whose KV stayed valid)
                                         head runs pairs (h_s, t_{s+1}) .. (h_{s+j}, t_{s+j+1} = the new token)
    prompt chunk:                        pairs of every computed position whose next token is known
    then, per proposing request:         x1 = argmax lm_head(out_last); (out_last, x1) -> x2; ... up to k

The first pass fills the head's KV for the step's positions (prompt chunks included), the loop proposes; its
proposals' KV lands in the lookahead slots the scheduler allocated (SchedulerConfig.num_lookahead_tokens).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sluice.sample.argmax import row_argmax
from sluice.spec_decode.config import SpeculativeConfig
from sluice.spec_decode.draft_model import DraftModelProposer
from sluice.worker.input_batch import segment_offsets

if TYPE_CHECKING:
    from sluice.worker.input_batch import StepInputs
    from sluice.worker.model_runner import ModelRunner


class EagleHead(nn.Module):
    """fc over [embeddings, target hidden] -> one Llama decoder layer without its input norm -> hidden."""

    def __init__(self, config: Any, dtype: torch.dtype, device: torch.device, attn_backend: Any,
                 fc_bias: bool, own_embedding: bool) -> None:
        super().__init__()
        from sluice.layers.vocab import VocabEmbedding
        from sluice.models.llama import LlamaForCausalLM, _construction_defaults
        with _construction_defaults(dtype, device):
            self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=fc_bias)
            self.layers = nn.ModuleList([LlamaForCausalLM.make_layer(config, attn_backend, i)
                                         for i in range(config.num_hidden_layers)])
            self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size) if own_embedding else None
        self.layers[0].input_layernorm = nn.Identity()  # EAGLE feeds fc's output to layer 0 unnormalized

    def forward(self, embeddings: torch.Tensor, target_hidden: torch.Tensor, positions: torch.Tensor,
                metadata: Any) -> torch.Tensor:
        hidden = self.fc(torch.cat([embeddings, target_hidden.to(embeddings.dtype)], dim=-1))
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        return hidden + residual

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        load_head_weights(self, weights, "EAGLE", "fc, layers.0.*, embed_tokens")


def load_head_weights(head: nn.Module, weights: dict[str, torch.Tensor], kind: str, expected: str) -> None:
    """Fills every parameter of ``head`` (q/k/v and gate/up into its merged projections) from checkpoint tensors
    named as its parameters are; a tensor that matches none, or a parameter left unfilled, is a ValueError."""
    from sluice.layers.linear import default_weight_loader
    from sluice.models.llama import LlamaForCausalLM
    params = dict(head.named_parameters())
    loaded = set()
    for name, tensor in weights.items():
        name = name.removeprefix("model.")
        shard = None
        for param_part, weight_part, shard_id in LlamaForCausalLM.stacked_params_mapping:
            if weight_part in name:
                name, shard = name.replace(weight_part, param_part), shard_id
                break
        if name not in params:
            raise ValueError(f"{kind} checkpoint tensor {name!r} matches no parameter of the head "
                             f"(expected {expected})")
        param = params[name]
        getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{kind} checkpoint is missing {', '.join(missing[:8])}")


def read_eagle_weights(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of an EAGLE folder (one layer: small): safetensors, else pytorch_model.bin."""
    from sluice.models.loader import iterate_safetensors
    if any(Path(folder).glob("*.safetensors")):
        return dict(iterate_safetensors(folder))
    weights = {}
    for file in sorted(Path(folder).glob("pytorch_model*.bin")):
        weights.update(torch.load(file, map_location="cpu", weights_only=True))
    if not weights:
        raise ValueError(f"speculative_config.model {folder!r} holds no *.safetensors or pytorch_model*.bin")
    return weights


class EagleProposer(DraftModelProposer):
    """The draft-model proposer's KV cache and decode loop, with the EAGLE head's inputs (hidden states)."""
    keeps_up_in_forward = False  # the head's KV of a step is written in propose, once the next tokens are known

    def __init__(self, config: SpeculativeConfig) -> None:
        super().__init__(config)
        self._step: tuple["StepInputs", torch.Tensor] | None = None

    def load(self, runner: "ModelRunner") -> None:
        hf = self.config.draft_hf_config
        weights = read_eagle_weights(self.config.model)
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
        self.model = EagleHead(hf, runner.dtype, runner.device, runner.attn_backend, "fc.bias" in weights,
                               "embed_tokens.weight" in weights)
        self.model.load_weights(weights)
        self.model.eval()
        self._target = runner.model
        self._init_kv_spec(hf, runner)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        embed = self.model.embed_tokens if self.model.embed_tokens is not None else self._target.model.embed_tokens
        return embed(tokens)

    def after_forward(self, runner: "ModelRunner", inputs: "StepInputs", hidden: torch.Tensor) -> None:
        if inputs.sampling_req_ids:
            self._step = (inputs, hidden)  # the head needs the next tokens: it runs once they are verified
        else:  # prompt chunks only: every next token is a known prompt token
            self._run_pairs(runner, inputs, hidden)

    def propose(self, runner: "ModelRunner", req_ids: list[str], rows: np.ndarray) -> dict[str, list[int]]:
        inputs, hidden = self._step
        self._step = None
        filled = self._run_pairs(runner, inputs, hidden)
        if filled is None:
            return {}
        out, last_of_row = filled
        proposing = [(req_id, int(row)) for req_id, row in zip(req_ids, rows.tolist()) if int(row) in last_of_row]
        if not proposing or not self.config.allows_proposals(len(runner.requests)):
            return {}
        prop_rows = np.array([row for _, row in proposing], dtype=np.int64)
        features = out[torch.tensor([last_of_row[row] for _, row in proposing], device=runner.device)]
        proposals, num_steps = self._decode_loop(runner, prop_rows, features)
        return {req_id: proposals[i, :num_steps[i]].tolist() for i, (req_id, _) in enumerate(proposing)
                if num_steps[i]}

    def _run_pairs(self, runner: "ModelRunner", inputs: "StepInputs", hidden: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[int, int]] | None:
        """Runs the head over the step's pairs whose next token is known; (its outputs, each row's last pair)."""
        batch, device = runner.input_batch, runner.device
        # Pairs of every request of the step: positions from its first scheduled one up to its valid KV.
        starts = inputs.positions[inputs.query_start_loc[:-1].astype(np.int64)] if len(inputs.rows) else np.zeros(0)
        ends = np.minimum(inputs.seq_lens.astype(np.int64), batch.num_computed_tokens[inputs.rows])
        lengths = np.maximum(ends - starts, 0)
        keep = lengths > 0
        step_rows, starts, lengths, ends = inputs.rows[keep], starts[keep], lengths[keep], ends[keep]
        if not len(step_rows):
            return None
        offsets = segment_offsets(lengths)
        positions = np.repeat(starts, lengths) + offsets
        flat = np.repeat(inputs.query_start_loc[:-1][keep].astype(np.int64), lengths) + offsets
        token_rows = np.repeat(step_rows, lengths)
        tokens = torch.from_numpy(batch.token_ids[token_rows, positions + 1]).to(device)
        target_hidden = hidden[torch.from_numpy(flat).to(device)]
        out = self._run(runner, tokens, target_hidden, positions, token_rows, step_rows, lengths, ends)
        return out, {int(r): int(i) for r, i in zip(step_rows, np.cumsum(lengths) - 1)}

    def _run(self, runner, tokens, target_hidden, positions, token_rows, step_rows, lengths, seq_lens):
        block_size = runner.block_size
        slots = runner.input_batch.block_table[token_rows, positions // block_size].astype(np.int64) * block_size \
            + positions % block_size
        metadata = self._metadata(runner, lengths, seq_lens, slots, step_rows)
        return self.model(self._embed(tokens), target_hidden,
                          torch.from_numpy(positions.astype(np.int64)).to(runner.device), metadata)

    def _decode_loop(self, runner: "ModelRunner", rows: np.ndarray, features: torch.Tensor
                     ) -> tuple[np.ndarray, np.ndarray]:
        batch, device = runner.input_batch, runner.device
        first = batch.num_tokens[rows] - 1  # the first proposal's pair sits one past the last verified one
        allocated = batch.num_blocks[rows] * runner.block_size
        num_steps = np.clip(allocated - first, 0, self.num_speculative_tokens)
        # Filled on the device and read once at the end: no sync per head step.
        proposals = torch.zeros((len(rows), self.num_speculative_tokens), dtype=torch.long, device=device)
        tokens = self._next_tokens(features)
        active = np.arange(len(rows))
        for j in range(int(num_steps.max(initial=0))):
            proposals[torch.from_numpy(active).to(device), j] = tokens
            keep = num_steps[active] > j + 1
            if not keep.any():
                break
            index = torch.from_numpy(np.flatnonzero(keep)).to(device)
            tokens, features, active = tokens.index_select(0, index), features.index_select(0, index), active[keep]
            positions = first[active] + j
            ones = np.ones(len(active), dtype=np.int64)
            features = self._run(runner, tokens, features, positions, rows[active], rows[active], ones, positions + 1)
            tokens = self._next_tokens(features)
        return proposals.cpu().numpy(), num_steps

    def _next_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The head's guesses (target token ids) after its outputs ``features``: the target's lm_head, argmax."""
        return row_argmax(self._target.compute_logits(features).to(torch.float32))
