"""Mixture-of-experts layers: the top-k router and the experts, whose weights are stacked per layer.

    hidden [T, H] -> gate -> router logits [T, E] -> softmax (float32) -> top-k -> (renormalize)
                  -> topk_weights [T, k] (float32), topk_ids [T, k]
    out[t] = sum_j topk_weights[t, j] * expert_e(hidden[t]),  e = topk_ids[t, j]
    expert_e(x) = down_e(silu(gate_e(x)) * up_e(x))

Every expert's weights live in two stacked parameters, filled one checkpoint tensor at a time by
``FusedMoE.weight_loader`` with shard ids ``(expert, "w1" | "w3" | "w2")``:

    w13_weight [E, 2 * I, H]   expert e: [ gate rows (w1) | up rows (w3) ]
    w2_weight  [E, H, I]       expert e: down (w2)

On CUDA routing and experts run as the fused Triton kernels of ``fused_moe`` (one routing kernel,
tokens sorted by expert, grouped GEMMs over the stacked weights); elsewhere ``select_experts`` and
``experts_torch`` run: the reference the kernels follow and the path the CPU equivalence tests trust.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from sluice.distributed.communication import tp_all_reduce
from sluice.layers.linear import ReplicatedLinear, copy_weight_checked, get_tp_rank_and_size

try:  # CPU-only installs have no triton; they run experts_torch
    from sluice.layers import fused_moe
except ImportError:
    fused_moe = None

# "model.layers.3.mlp.experts.17.gate_proj.weight" -> ("model.layers.3.mlp.experts", "17", "gate_proj")
_EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                   weights_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router logits [T, E] -> (topk_weights [T, k] float32, topk_ids [T, k] int64), as transformers routes.

    Softmax over all experts in float32, the k largest, then (``renormalize``) divided by their sum.
    ``weights_dtype``: round the weights to it (Qwen-MoE casts them to the logits' dtype; Mixtral keeps
    float32), so that half-precision runs see the reference's weights.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    if weights_dtype is not None:
        topk_weights = topk_weights.to(weights_dtype).float()
    return topk_weights, topk_ids


def experts_torch(hidden_states: torch.Tensor, w13_weight: torch.Tensor, w2_weight: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The reference: each expert that some token chose runs on its tokens; outputs are weighted and
    summed in float32, then rounded once to the input dtype."""
    num_tokens, top_k = topk_ids.shape
    out = torch.zeros(num_tokens, hidden_states.shape[1], dtype=torch.float32, device=hidden_states.device)
    flat_ids = topk_ids.flatten()
    for expert in flat_ids.unique().tolist():
        slots = (flat_ids == expert).nonzero().squeeze(1)
        tokens = slots // top_k
        gate, up = F.linear(hidden_states[tokens], w13_weight[expert]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, w2_weight[expert])
        out.index_add_(0, tokens, expert_out.float() * topk_weights.flatten()[slots, None])
    return out.to(hidden_states.dtype)


def expert_param_for(checkpoint_name: str, gate_name: str, up_name: str, down_name: str
                     ) -> tuple[str, tuple[int, str]] | None:
    """A per-expert checkpoint tensor -> (stacked parameter name, (expert, shard)); None for other tensors.

    ``gate_name`` etc. are the family's projection names (Mixtral: w1, w3, w2; Qwen: gate_proj, ...).
    """
    match = _EXPERT_TENSOR.match(checkpoint_name)
    if match is None:
        return None
    prefix, expert, projection = match.groups()
    shard = {gate_name: "w1", up_name: "w3", down_name: "w2"}.get(projection)
    if shard is None:
        return None
    return f"{prefix}.{'w2_weight' if shard == 'w2' else 'w13_weight'}", (int(expert), shard)


class FusedMoE(nn.Module):
    """The experts of one layer: stacked weights, routing, and the fused kernels on CUDA.

    ``w13_weight.num_shards`` is 2E and ``w2_weight.num_shards`` E: the model's loader checks that
    every expert's gate, up and down tensors arrived.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, round_weights_to_dtype: bool = False) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..{num_experts}, got {top_k}")
        self.tp_rank, self.tp_size = get_tp_rank_and_size()
        self.num_experts, self.top_k = num_experts, top_k
        self.intermediate_size = intermediate_size // self.tp_size  # per rank, as column-parallel gate/up
        self.renormalize, self.round_weights_to_dtype = renormalize, round_weights_to_dtype
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate_size, hidden_size),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate_size),
                                      requires_grad=False)
        for param, num_shards in ((self.w13_weight, 2 * num_experts), (self.w2_weight, num_experts)):
            param.weight_loader = self.weight_loader
            param.num_shards = num_shards

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: tuple[int, str]) -> None:
        """One expert's gate (w1), up (w3) or down (w2) tensor into its slice of the stacked parameter."""
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and shard_id[1] in ("w1", "w2", "w3")
                and 0 <= shard_id[0] < self.num_experts):
            raise ValueError(f"shard_id must be (expert in 0..{self.num_experts - 1}, 'w1' | 'w2' | 'w3'), "
                             f"got {shard_id!r}")
        expert, shard = shard_id
        size = self.intermediate_size
        if shard == "w2":  # down: input columns split across ranks
            target, rank_dim = param.data[expert], 1
        else:  # gate / up: output rows split across ranks
            target, rank_dim = param.data[expert].narrow(0, 0 if shard == "w1" else size, size), 0
        if self.tp_size > 1:
            loaded_weight = loaded_weight.narrow(rank_dim, self.tp_rank * size, size)
        with torch.no_grad():
            copy_weight_checked(target, loaded_weight, f"{type(self).__name__} expert {expert} {shard}")

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], router logits [T, E] -> [T, H]. With tensor parallelism each rank holds a slice of every
        expert's intermediate dimension; the partial outputs are all-reduced."""
        out = self._experts(hidden_states, router_logits)
        return tp_all_reduce(out) if self.tp_size > 1 else out

    def _experts(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if fused_moe is not None and fused_moe.can_fused_experts(hidden_states, self.w13_weight, self.w2_weight):
            topk_weights, topk_ids = fused_moe.route(router_logits, self.top_k, self.renormalize,
                                                     self.round_weights_to_dtype)
            return fused_moe.fused_experts(hidden_states, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        weights_dtype = router_logits.dtype if self.round_weights_to_dtype else None
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize, weights_dtype)
        return experts_torch(hidden_states, self.w13_weight, self.w2_weight, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """A decoder layer's feed-forward block: router ``gate`` [E, H] and ``experts``.

    The names match the checkpoints' (``mlp.gate.weight``, ``mlp.experts.{e}.*``).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 renormalize: bool, round_weights_to_dtype: bool = False) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize,
                                round_weights_to_dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))
