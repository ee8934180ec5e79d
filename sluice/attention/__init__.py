"""Paged attention backends sharing one metadata: Triton (CUDA), the fast CPU path, and the torch reference.

On CPU the fast path (``cpu_sdpa``: one padded SDPA call per group of requests, decodes in the native paged
kernel when a C compiler can build it) is the default (``native``); ``SLUICE_CPU_ATTENTION=sdpa`` keeps decodes
on SDPA too, and ``SLUICE_CPU_ATTENTION=reference`` selects the reference (``torch_ref``: a loop over requests in float32),
which the fast path is tested against.
"""
import os

from sluice.attention.backend import AttentionBackend, AttentionMetadata

ENV_CPU_ATTENTION = "SLUICE_CPU_ATTENTION"
CPU_ATTENTION_BACKENDS = ("native", "sdpa", "reference")


def get_attention_backend(device_type: str) -> AttentionBackend:
    if device_type == "cuda":
        from sluice.attention.triton_paged import TritonPagedBackend
        return TritonPagedBackend()
    choice = os.environ.get(ENV_CPU_ATTENTION, "native")
    if choice not in CPU_ATTENTION_BACKENDS:
        raise ValueError(f"${ENV_CPU_ATTENTION} must be one of {', '.join(CPU_ATTENTION_BACKENDS)}, got {choice!r}")
    if choice == "reference":
        from sluice.attention.torch_ref import TorchRefBackend
        return TorchRefBackend()
    from sluice.attention.cpu_sdpa import CpuSdpaBackend
    return CpuSdpaBackend(native_decode=choice == "native")


__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
