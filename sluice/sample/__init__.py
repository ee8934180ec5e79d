"""Sampling: per-request state, batched metadata, logit processing, the sampler, logprobs."""
from sluice.sample.logprobs import compute_prompt_logprobs, to_logprob_dicts
from sluice.sample.metadata import RequestSamplingState, SamplingMetadata
from sluice.sample.sampler import Sampler, SamplerOutput

__all__ = ["RequestSamplingState", "SamplingMetadata", "Sampler", "SamplerOutput",
           "compute_prompt_logprobs", "to_logprob_dicts"]
