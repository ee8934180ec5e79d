"""Paged attention backends: the torch reference (CPU) and Triton (CUDA), sharing one metadata."""
from sluice.attention.backend import AttentionBackend, AttentionMetadata


def get_attention_backend(device_type: str) -> AttentionBackend:
    if device_type == "cuda":
        from sluice.attention.triton_paged import TritonPagedBackend
        return TritonPagedBackend()
    from sluice.attention.torch_ref import TorchRefBackend
    return TorchRefBackend()


__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
