"""LLMEngine: the synchronous front of the engine core (text in, RequestOutputs out).

It tokenizes and validates prompts, fans ``n > 1`` out into child requests, feeds the
core, detokenizes incrementally, applies stop strings, and assembles RequestOutputs in
the requested output kind. The async server wraps exactly this object.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from sluice.config import EngineArgs
from sluice.core.interface import EngineCoreOutput
from sluice.core.request import Request
from sluice.engine.engine_core import EngineCore
from sluice.engine.output_processor import OutputProcessor, ParentRequestState
from sluice.engine.stats import EngineInfo, IterationStats, StatLogger
from sluice.models.model_config import ModelConfig
from sluice.outputs import RequestOutput
from sluice.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]


class LLMEngine:
    def __init__(self, model_config: ModelConfig, args: EngineArgs,
                 stat_loggers: list[StatLogger] | None = None, core: EngineCore | None = None) -> None:
        """``core``: the engine core to drive; by default an in-process EngineCore (the server may pass a
        client of a core running in its own process, with the same calls)."""
        from sluice.tokenizer import end_of_turn_token_ids, get_chat_template, get_tokenizer

        self.model_config = model_config
        self.args = args
        self.tokenizer = get_tokenizer(model_config.model, args.tokenizer)
        self.chat_template = get_chat_template(self.tokenizer)
        self.eos_token_id, extra_eos = _eos_ids(model_config.hf_config, self.tokenizer)
        self.extra_stop_token_ids = sorted(set(extra_eos) | set(
            end_of_turn_token_ids(self.tokenizer, self.chat_template)) - {self.eos_token_id})
        self.core = core if core is not None else EngineCore(model_config, args)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stat_loggers = list(stat_loggers or [])
        # OpenTelemetry spans per request (sluice/tracing.py); None, and nothing runs, without the flag.
        from sluice.tracing import RequestTracer
        self.tracer = RequestTracer.from_engine_args(args, model_config.served_model_name)
        if self.tracer is not None:
            self.stat_loggers.append(self.tracer)
        self.max_model_len = model_config.max_model_len
        self._log_startup()
        info = EngineInfo(self.core.cache_config, dict(getattr(self.core, "startup_seconds", {})))
        for stat_logger in self.stat_loggers:
            hook = getattr(stat_logger, "log_engine_initialized", None)
            if hook is not None:
                hook(info)

    def _log_startup(self) -> None:
        cfg, core = self.model_config, self.core
        cache = core.cache_config
        logger.info("model %s (%s): %.1fM parameters, %s on %s, loaded in %.1f s",
                    cfg.served_model_name, cfg.model, core.num_parameters / 1e6, cfg.dtype, cfg.device,
                    core.load_seconds)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB); max_model_len %d, "
                    "max_num_seqs %d, max_num_batched_tokens %d, prefix caching %s",
                    cache.num_blocks, cache.block_size, core.num_kv_tokens,
                    cache.num_blocks * core.kv_bytes_per_block / 2**20, cfg.max_model_len,
                    core.scheduler_config.max_num_seqs, core.scheduler_config.max_num_batched_tokens,
                    "on" if cache.enable_prefix_caching else "off")

    @classmethod
    def from_engine_args(cls, args: EngineArgs, stat_loggers: list[StatLogger] | None = None) -> "LLMEngine":
        args.validate()
        return cls(ModelConfig.from_engine_args(args), args, stat_loggers)

    # ---- requests ----------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None) -> None:
        params = (params or SamplingParams()).clone()
        prompt_text, prompt_ids = self.tokenize_prompt(prompt)
        if params.bad_words:
            params.update_bad_words_from_tokenizer(self.tokenizer)
        self._validate(prompt_ids, params)
        params.update_from_tokenizer(self.eos_token_id, self.extra_stop_token_ids)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        parent = ParentRequestState(request_id, prompt_text, prompt_ids, params, arrival_time, priority)
        for child_id, child_params in self.output_processor.add_request(parent):
            self.core.add_request(Request(
                child_id, prompt_ids, child_params, eos_token_id=self.eos_token_id, priority=priority,
                arrival_time=arrival_time, parent_request_id=request_id if params.n > 1 else None))

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab_size = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range for vocab size {vocab_size}")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens long, but max_model_len is "
                             f"{self.max_model_len}: it must leave room for at least one output token")
        kv_tokens = self.core.num_kv_tokens
        needed = len(prompt_ids) + (params.max_tokens or 1)
        if len(prompt_ids) + 1 > kv_tokens:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens long, but the KV cache holds only "
                             f"{kv_tokens} tokens")
        if needed > kv_tokens and params.max_tokens is not None:
            params.max_tokens = kv_tokens - len(prompt_ids)
            logger.warning("max_tokens lowered to %d: the KV cache holds %d tokens", params.max_tokens, kv_tokens)
        params.verify()
        params.verify_max_logprobs(self.args.max_logprobs)
        params.verify_against_vocab(vocab_size)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        child_ids = self.output_processor.abort_requests(request_ids)
        self.core.abort_requests(child_ids)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.num_unfinished_requests

    # ---- the loop ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        step_start_time = time.monotonic()
        core_outputs: list[EngineCoreOutput] = self.core.step()
        iteration_stats = IterationStats(step_start_time=step_start_time)
        outputs, stopped_ids = self.output_processor.process(core_outputs, iteration_stats)
        if stopped_ids:
            self.core.stop_requests(stopped_ids)
        if self.stat_loggers:
            scheduler_stats = self.core.make_stats()
            for stat_logger in self.stat_loggers:
                stat_logger.record(scheduler_stats, iteration_stats)
        return outputs

    # ---- chat --------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs: Any) -> list[int]:
        from sluice.tokenizer import apply_chat_template
        return apply_chat_template(self.tokenizer, messages, chat_template or self.chat_template,
                                   add_generation_prompt=add_generation_prompt, **kwargs)


def _eos_ids(hf_config: Any, tokenizer: Any) -> tuple[int | None, list[int]]:
    """The model's eos id, plus any further ids that also end generation (Llama 3 lists several)."""
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        return (eos[0] if eos else None), list(eos[1:])
    return eos, []
