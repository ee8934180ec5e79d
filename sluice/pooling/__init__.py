"""Pooling (embedding) models: config from sentence-transformers files, per-request params, the runner's
pooler, and the engine front that turns pooled vectors into EmbeddingRequestOutputs."""
from sluice.pooling.config import PoolerConfig
from sluice.pooling.outputs import EmbeddingOutput, EmbeddingRequestOutput, PoolingOutput, PoolingRequestOutput
from sluice.pooling.params import PoolingParams

__all__ = ["EmbeddingOutput", "EmbeddingRequestOutput", "PoolerConfig", "PoolingOutput", "PoolingParams",
           "PoolingRequestOutput"]
