"""Fused bfloat16 kernels for the CPU path: add + RMSNorm, SiLU * mul and neox rope, one C call each; and
structured outputs' token bitmask applied to CPU logits (exact, any float dtype).

At a CPU decode step's few rows a decoder layer's elementwise work costs more in op dispatch than in arithmetic:
the torch references (``forward_torch`` of norm.py, activation.py, rotary.py) run 5-12 ops each, 30 layers a step.
csrc/cpu_fused.c does each in one call, rounding to bfloat16 wherever the reference does (its comment says what
can still differ: the order of the RMS sum, and cos/sin/exp within a float32 ulp).

The CUDA path's Triton kernels (fused_kernels.py) have the same ``can_*`` / op pairs; a layer asks this module
only when those decline. float32 never comes here (but for the bitmask, which only keeps or replaces values): the
float32 CPU path stays torch, the transformers-exact oracle the tests trust. The library is built on first use
with the system compiler (attention/cpu_kernel.py's builder and cache); without one, or with
``SLUICE_CPU_FUSED=0``, every ``can_*`` says no and the references run.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from sluice.attention import cpu_kernel

ENV_FUSED = "SLUICE_CPU_FUSED"
SOURCE = Path(__file__).parent / "csrc" / "cpu_fused.c"
FLAGS = cpu_kernel.FLAGS + ("-fno-math-errno",)  # sqrtf without errno: the norm loop vectorizes
MAX_WIDTH = 16384  # the norm's row buffer (cpu_fused.c MAX_STACK_WIDTH)
MAX_ROTARY_DIM = 1024
PARALLEL_MIN_ROWS = 16  # cpu_fused.c: fewer rows run on the calling thread

_P, _I, _L, _F, _U = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_uint32
_SIGNATURES = {
    "sluice_rms_norm": (_P, _P, _P, _P, _P, _I, _I, _L, _L, _L, _L, _F, _I, _I),
    "sluice_silu_and_mul": (_P, _P, _I, _I, _L, _L, _I),
    "sluice_rope_neox": (_P, _P, _P, _P, _I, _I, _I, _I, _I, _L, _L, _I),
    "sluice_apply_bitmask": (_P, _I, _U, _L, _P, _L, _P, _I, _L, _L, _I),
}
_NEG_INF_BITS = {torch.float32: 0xFF800000, torch.bfloat16: 0xFF80, torch.float16: 0xFC00}


class _Kernels:
    def __init__(self, library: ctypes.CDLL) -> None:
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(library, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        self.rms_norm = library.sluice_rms_norm
        self.silu_and_mul = library.sluice_silu_and_mul
        self.rope_neox = library.sluice_rope_neox
        self.apply_bitmask = library.sluice_apply_bitmask


_kernels: _Kernels | None | bool = None  # None: not tried yet; False: unavailable


def kernels() -> _Kernels | None:
    global _kernels
    if _kernels is None:
        library = None
        if os.environ.get(ENV_FUSED, "1") != "0":
            library = cpu_kernel.build_library(SOURCE, "CPU fused bfloat16 kernels", "the torch ops run", flags=FLAGS)
        _kernels = _Kernels(library) if library is not None else False
    return _kernels or None


_BF16 = torch.bfloat16


def _threads(rows: int) -> int:
    """torch's thread count for calls the kernels spread over threads (the OpenMP team otherwise defaults to
    every core, whatever ``--cpu-threads`` said)."""
    return torch.get_num_threads() if rows >= PARALLEL_MIN_ROWS else 1


def _bf16_rows(x: torch.Tensor) -> bool:
    """A CPU bfloat16 matrix with unit column stride. These checks run several times per layer and step: each is
    an attribute read, no allocation (``x.is_cpu``, not ``x.device.type``)."""
    return x.dtype is _BF16 and x.is_cpu and x.dim() == 2 and x.stride(1) == 1


def can_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Rows [T, width] (any row stride), or a contiguous [..., width] (per-head q/k norms: [T, heads, D])."""
    return ((_bf16_rows(x) or (x.dtype is _BF16 and x.is_cpu and x.dim() > 2 and x.is_contiguous()))
            and weight.dtype is _BF16 and weight.stride(0) == 1 and x.shape[-1] == weight.shape[0] <= MAX_WIDTH
            and (residual is None or (_bf16_rows(residual) and residual.shape == x.shape))
            and (_kernels or kernels()) is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             gemma: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm.forward_torch (``gemma``: GemmaRMSNorm's, scaling by 1 + weight) in one call."""
    shape, width = x.shape, x.shape[-1]
    if x.dim() > 2:
        x = x.view(-1, width)
    rows = x.shape[0]
    out = x.new_empty(shape)
    new_residual = None if residual is None else x.new_empty(shape)
    _kernels.rms_norm(x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(),
                      out.data_ptr(), 0 if new_residual is None else new_residual.data_ptr(), rows, width,
                      x.stride(0), 0 if residual is None else residual.stride(0), width, width, eps, int(gemma),
                      _threads(rows))
    return out if residual is None else (out, new_residual)


def can_silu_and_mul(x: torch.Tensor) -> bool:
    return _bf16_rows(x) and x.shape[1] % 2 == 0 and (_kernels or kernels()) is not None


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    rows, width = x.shape
    out = x.new_empty(rows, width // 2)
    _kernels.silu_and_mul(x.data_ptr(), out.data_ptr(), rows, width // 2, x.stride(0), width // 2, _threads(rows))
    return out


def can_apply_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, inv_freq: torch.Tensor,
                     head_dim: int, rotary_dim: int) -> bool:
    return (_bf16_rows(query) and _bf16_rows(key) and positions.dtype is torch.int64 and positions.is_contiguous()
            and inv_freq.dtype is torch.float32 and inv_freq.is_contiguous() and inv_freq.device.type == "cpu"
            and positions.shape[0] == query.shape[0] == key.shape[0] and rotary_dim % 2 == 0
            and rotary_dim <= min(head_dim, MAX_ROTARY_DIM)
            and query.shape[1] % head_dim == 0 and key.shape[1] % head_dim == 0 and (_kernels or kernels()) is not None)


def apply_rotary_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, inv_freq: torch.Tensor,
                  head_dim: int, rotary_dim: int) -> None:
    """Rotates q [T, H * D] and k [T, Hkv * D] in place (they may be column slices of one qkv tensor)."""
    _kernels.rope_neox(query.data_ptr(), key.data_ptr(), positions.data_ptr(), inv_freq.data_ptr(),
                        query.shape[0], query.shape[1] // head_dim, key.shape[1] // head_dim, head_dim, rotary_dim,
                        query.stride(0), key.stride(0), _threads(query.shape[0]))


def can_apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> bool:
    return (logits.is_cpu and logits.dtype in _NEG_INF_BITS and logits.dim() == 2 and logits.stride(1) == 1
            and bitmask.is_cpu and bitmask.dtype is torch.int32 and bitmask.dim() == 2 and bitmask.stride(1) == 1
            and (_kernels or kernels()) is not None)


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab_size: int) -> None:
    """Sets logits[r, t] = -inf for each r in ``rows`` and each t < ``vocab_size`` whose bit in bitmask row r is 0
    (xgrammar's layout: bit j of word w is token 32w + j), and each t >= ``vocab_size`` (ids past the grammar's),
    in place: 1.2 ms for 256 rows of 49,152 float32 logits on 2 cores, where xgrammar's CPU kernel takes 34 ms
    (67 ms when nearly every bit is 0, as in JSON)."""
    if vocab_size > min(logits.shape[1], bitmask.shape[1] * 32) or (
            rows and (min(rows) < 0 or max(rows) >= min(logits.shape[0], bitmask.shape[0]))):
        raise ValueError("apply_bitmask_: rows or vocab_size outside the logits or the bitmask")
    row_ids = torch.tensor(rows, dtype=torch.int64)
    _kernels.apply_bitmask(logits.data_ptr(), logits.element_size(), _NEG_INF_BITS[logits.dtype], logits.stride(0),
                           bitmask.data_ptr(), bitmask.stride(0), row_ids.data_ptr(), len(rows), vocab_size,
                           logits.shape[1], _threads(len(rows)))
