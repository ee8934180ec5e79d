"""Model families, the architecture registry and the checkpoint loader."""
from sluice.models.registry import get_model_class, resolve_model_class, supported_architectures

__all__ = ["get_model_class", "resolve_model_class", "supported_architectures"]
