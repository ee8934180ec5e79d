"""Linear layers whose parameters load themselves: each carries ``weight_loader(param, loaded_weight, shard_id)``.

Merged projections take HF's separate tensors one shard at a time:

    qkv_proj.weight      [q rows | k rows | v rows]     <- q_proj (shard "q"), k_proj ("k"), v_proj ("v")
    gate_up_proj.weight  [gate rows | up rows]          <- gate_proj (shard 0), up_proj (shard 1)

Tensor parallelism (sluice/distributed/) splits column-parallel layers by output rows and
row-parallel layers by input columns; each loader narrows the full checkpoint tensor to this
rank's part, and a row-parallel layer all-reduces its partial outputs. With fewer KV heads than
ranks, each KV head is replicated on tp_size / num_kv_heads ranks. Quantization attaches as the
layer's ``linear_method``, chosen when the layer is built (sluice/layers/quantization/): it creates
the weight tensors and applies them; the models never see it.
"""
from __future__ import annotations

import torch
from torch import nn

from sluice.distributed.communication import tp_all_reduce
from sluice.distributed.parallel_state import get_tp_rank_and_size
from sluice.layers.quantization.base import LinearMethod, UnquantizedLinearMethod, linear_method_for_new_layer

__all__ = ["UnquantizedLinearMethod", "get_tp_rank_and_size"]


def copy_weight_checked(target: torch.Tensor, loaded_weight: torch.Tensor, name: str) -> None:
    if target.shape != loaded_weight.shape:
        raise ValueError(f"{name}: checkpoint tensor has shape {tuple(loaded_weight.shape)}, "
                         f"expected {tuple(target.shape)}")
    target.copy_(loaded_weight)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    with torch.no_grad():
        copy_weight_checked(param.data, loaded_weight, "parameter")


class LinearBase(nn.Module):
    """y = x W^T + b with W [output_size / tp, input_size] (column) or [output_size, input_size / tp] (row).

    ``tp_dim`` is the weight dimension split across ranks (0 rows, 1 columns, None replicated).
    ``num_shards`` tells the loader how many checkpoint tensors fill the weight (3 for qkv); ``shard_ids``
    and ``shard_sizes`` name them in output order.
    """

    tp_dim: int | None = None
    shard_ids: tuple = (None,)

    def __init__(self, input_size: int, output_size: int, bias: bool, num_shards: int = 1) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank_and_size()
        self.input_size, self.output_size, self.num_shards = input_size, output_size, num_shards
        # Built under the model's default dtype and device: quant methods create their tensors alike.
        self.dtype, self.device = torch.get_default_dtype(), torch.empty(0).device
        self.linear_method: LinearMethod = linear_method_for_new_layer()
        self.linear_method.create_weights(self)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
            self.bias.num_shards = num_shards
        else:
            self.register_parameter("bias", None)

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        """Output rows of each shard, in ``shard_ids`` order."""
        return (self.output_size,)

    def check_shard_id(self, shard_id) -> None:
        if shard_id not in self.shard_ids:
            raise ValueError(f"{type(self).__name__}: shard_id must be one of {self.shard_ids}, got {shard_id!r}")

    def set_linear_method(self, method: LinearMethod) -> None:
        """Replaces the quant method (and its tensors) before loading: for layers a checkpoint leaves dense."""
        for name, _ in list(self.named_parameters(recurse=False)):
            if name != "bias":
                delattr(self, name)
        with torch.device(self.device):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                method.create_weights(self)
            finally:
                torch.set_default_dtype(previous)
        self.linear_method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x)

    def _narrow_to_rank(self, loaded_weight: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of a full checkpoint tensor along ``dim``."""
        if self.tp_size == 1:
            return loaded_weight
        size = loaded_weight.shape[dim] // self.tp_size
        return loaded_weight.narrow(dim, self.tp_rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if self.tp_dim is not None and self.tp_dim < loaded_weight.dim():
            loaded_weight = self._narrow_to_rank(loaded_weight, self.tp_dim)
        with torch.no_grad():
            copy_weight_checked(param.data, loaded_weight, type(self).__name__)


class ReplicatedLinear(LinearBase):
    """Same full weight on every rank."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication needed after it."""

    tp_dim = 0

    def __init__(self, input_size: int, output_size: int, bias: bool = False, num_shards: int = 1) -> None:
        _, tp_size = get_tp_rank_and_size()
        super().__init__(input_size, output_size // tp_size, bias, num_shards)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input stacked in one matmul (gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, sum(output_sizes), bias, num_shards=len(output_sizes))

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(size // self.tp_size for size in self.output_sizes)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | None = None) -> None:
        if shard_id is None or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be in 0..{len(self.output_sizes) - 1}, got {shard_id!r}")
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        with torch.no_grad():
            copy_weight_checked(param.data.narrow(0, offset, size), self._narrow_to_rank(loaded_weight, 0),
                          f"{type(self).__name__} shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; output rows are [q heads | k heads | v heads] of this rank.

    Rank r holds q heads [r * H/N, (r + 1) * H/N) and the KV heads they attend with: Hkv/N of them, or,
    with fewer KV heads than ranks, the one KV head shared by N/Hkv consecutive ranks (replicated).
    """

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False) -> None:
        _, tp_size = get_tp_rank_and_size()
        check_tp_heads(total_num_heads, total_num_kv_heads, tp_size)
        self.head_dim = head_dim
        self.num_heads = total_num_heads // tp_size
        self.num_kv_heads = max(1, total_num_kv_heads // tp_size)
        self.num_kv_head_replicas = max(1, tp_size // total_num_kv_heads)
        output_size = (total_num_heads + 2 * self.num_kv_heads * tp_size) * head_dim
        super().__init__(hidden_size, output_size, bias, num_shards=3)

    @property
    def output_sizes(self) -> tuple[int, int, int]:
        """Per-rank sizes of the q, k and v parts of the output."""
        kv_size = self.num_kv_heads * self.head_dim
        return self.num_heads * self.head_dim, kv_size, kv_size

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return self.output_sizes

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        index = "qkv".index(shard_id)
        offset, size = sum(self.output_sizes[:index]), self.output_sizes[index]
        # Which slice of the checkpoint's heads this rank holds: its q heads, or its (maybe shared) KV heads.
        name = f"{type(self).__name__} shard {shard_id}"
        if self.tp_size > 1:
            num_blocks = self.tp_size if shard_id == "q" else self.tp_size // self.num_kv_head_replicas
            if loaded_weight.shape[0] != num_blocks * size:
                raise ValueError(f"{name}: checkpoint tensor has {loaded_weight.shape[0]} rows, "
                                 f"expected {num_blocks * size}")
            head_block = self.tp_rank if shard_id == "q" else self.tp_rank // self.num_kv_head_replicas
            loaded_weight = loaded_weight.narrow(0, head_block * size, size)
        with torch.no_grad():
            copy_weight_checked(param.data.narrow(0, offset, size), loaded_weight, name)


def check_tp_heads(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Each rank must hold whole query heads and whole KV heads (or one KV head shared by whole ranks)."""
    if num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} must divide the number of attention heads ({num_heads})")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {tp_size} must divide the number of KV heads ({num_kv_heads}) "
                         f"or be a multiple of it (KV heads are then replicated)")


class RowParallelLinear(LinearBase):
    """Input features split across ranks; the partial outputs are all-reduced (TP > 1).

    The bias is not split (1-D tensors are never narrowed along dim 1): rank 0 holds it and the other
    ranks hold zeros, so the sum adds it once.
    """

    tp_dim = 1

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        _, tp_size = get_tp_rank_and_size()
        super().__init__(input_size // tp_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if param is self.bias and self.tp_rank > 0:
            loaded_weight = torch.zeros_like(loaded_weight)
        super().weight_loader(param, loaded_weight, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear_method.apply(self, x)
        return tp_all_reduce(out) if self.tp_size > 1 else out
