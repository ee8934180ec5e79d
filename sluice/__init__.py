"""sluice: LLM inference and serving with a paged KV cache, prefix caching and continuous batching."""
from sluice.config import EngineArgs
from sluice.lora.request import LoRARequest
from sluice.outputs import CompletionOutput, Logprob, RequestOutput
from sluice.pooling import EmbeddingRequestOutput, PoolingParams, PoolingRequestOutput
from sluice.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and transformers: import it lazily so `sluice --help` stays fast.
    if name == "LLM":
        from sluice.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "EngineArgs", "RequestOutput", "CompletionOutput", "Logprob",
           "RequestOutputKind", "LoRARequest", "StructuredOutputsParams", "PoolingParams", "EmbeddingRequestOutput",
           "PoolingRequestOutput", "__version__"]
