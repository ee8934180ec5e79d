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

from sluice.config import EngineArgs, EngineConfig, create_engine_config
from sluice.core.interface import EngineCoreOutput
from sluice.core.request import Request
from sluice.engine.client import CoreAttachment, EngineCoreClient, InprocClient, make_engine_core_client
from sluice.engine.engine_core import EngineCore
from sluice.engine.output_processor import OutputProcessor, ParentRequestState
from sluice.lora.request import LoRARequest
from sluice.outputs import RequestOutput
from sluice.pooling.params import PoolingParams
from sluice.sampling_params import SamplingParams, check_context_length
from sluice.stats import EngineInfo, IterationStats, StatLogger

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]


class LLMEngine:
    def __init__(self, engine_core: EngineCoreClient, stat_loggers: list[StatLogger] | None = None) -> None:
        """``engine_core``: the client of a ready engine core (engine/client.py), in process or not; this
        engine validates requests against its ``config``."""
        from sluice.tokenizer import load_tokenizer

        self.engine_core = engine_core
        self.config: EngineConfig = engine_core.config
        self.model_config = self.config.model
        self.max_model_len = self.config.max_model_len  # capped by the KV cache
        self.tokenizer, self.chat_template = load_tokenizer(self.model_config)
        self.eos_token_id, self.extra_stop_token_ids = _stop_ids(self.model_config.hf_config, self.tokenizer,
                                                                 self.chat_template)
        self.output_processor = OutputProcessor(self.tokenizer)
        if self.model_config.pooler_config is not None:  # an embedding engine: pooled vectors, never text
            from sluice.pooling.front import PoolingOutputProcessor
            self.output_processor = PoolingOutputProcessor(self.model_config.pooler_config)
        self.stat_loggers = list(stat_loggers or [])
        self._checked_loras: set[LoRARequest] = set()  # adapters whose adapter_config.json passed the checks
        # OpenTelemetry spans per request (sluice/tracing.py); None, and nothing runs, without the flag.
        from sluice.tracing import RequestTracer
        self.tracer = RequestTracer.from_config(self.config.observability, self.model_config.served_model_name)
        if self.tracer is not None:
            self.stat_loggers.append(self.tracer)
        self._log_startup()
        info = EngineInfo(self.config.cache, dict(engine_core.info.startup_seconds))
        for stat_logger in self.stat_loggers:
            stat_logger.log_engine_initialized(info)

    def _log_startup(self) -> None:
        cfg, info, cache = self.model_config, self.engine_core.info, self.config.cache
        kv_dtype = cfg.dtype if cache.cache_dtype == "auto" else "float8_e4m3fn"  # --kv-cache-dtype
        logger.info("model %s (%s): %.1fM parameters, %s on %s, loaded in %.1f s",
                    cfg.served_model_name, cfg.model, info.num_parameters / 1e6, cfg.dtype, cfg.device,
                    info.load_seconds)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB of %s); max_model_len %d, "
                    "max_num_seqs %d, max_num_batched_tokens %d, prefix caching %s",
                    cache.num_blocks, cache.block_size, cache.num_kv_tokens,
                    cache.num_blocks * info.kv_bytes_per_block / 2**20, kv_dtype, self.max_model_len,
                    self.config.scheduler.max_num_seqs, self.config.scheduler.max_num_batched_tokens,
                    "on" if cache.enable_prefix_caching else "off")

    @classmethod
    def from_engine_args(cls, args: EngineArgs, stat_loggers: list[StatLogger] | None = None,
                         process_split: bool = False) -> "LLMEngine":
        return cls.from_config(create_engine_config(args), stat_loggers, process_split)

    @classmethod
    def from_config(cls, config: EngineConfig, stat_loggers: list[StatLogger] | None = None,
                    process_split: bool = False,
                    attach: CoreAttachment | list[CoreAttachment] | None = None) -> "LLMEngine":
        """An engine over the client ``make_engine_core_client`` makes for ``config``."""
        client = make_engine_core_client(config, process_split, attach)
        try:
            return cls(client, stat_loggers)
        except BaseException:
            client.shutdown()
            raise

    @property
    def core(self) -> EngineCore:
        """The EngineCore itself, when it runs in this process (tests, benchmarks and profiling reach in)."""
        if not isinstance(self.engine_core, InprocClient):
            raise AttributeError("the engine core runs in another process")
        return self.engine_core.engine_core

    def check_health(self) -> None:
        """Raises EngineDeadError if the engine core is gone."""
        self.engine_core.check_health()

    def shutdown(self) -> None:
        self.engine_core.shutdown()
        if self.tracer is not None:
            self.tracer.shutdown()  # flushes the spans still batched

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
            self._need_tokenizer("a text prompt", "prompt")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        if lora_request is not None:
            self._check_lora(lora_request)
        if self.model_config.pooler_config is not None or isinstance(params, PoolingParams):
            from sluice.pooling.front import add_pooling_request  # embeddings: sluice/pooling/front.py
            return add_pooling_request(self, request_id, prompt, params, priority, arrival_time)
        params = (params or SamplingParams()).clone()
        prompt_text, prompt_ids = self.tokenize_prompt(prompt)
        if params.bad_words:
            self._need_tokenizer("bad_words", "bad_words")
            params.update_bad_words_from_tokenizer(self.tokenizer)
        if params.stop:
            self._need_tokenizer("stop strings", "stop")
        if params.structured_outputs is not None:
            self._check_structured_outputs(params)
        self._validate(prompt_ids, params)
        params.update_from_tokenizer(self.eos_token_id, self.extra_stop_token_ids)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        parent = ParentRequestState(request_id, prompt_text, prompt_ids, params, arrival_time, priority)
        children = self.output_processor.add_request(parent)
        try:
            for child_id, child_params in children:
                self.engine_core.add_request(Request(
                    child_id, prompt_ids, child_params, eos_token_id=self.eos_token_id, priority=priority,
                    arrival_time=arrival_time, parent_request_id=request_id if params.n > 1 else None,
                    lora_request=lora_request))
        except BaseException:
            self.abort_request(request_id)  # children already added give their blocks back; nothing leaks
            raise

    def _check_lora(self, lora_request: LoRARequest) -> None:
        """A ValueError before the request goes in when the engine or the adapter's config cannot serve it."""
        if self.config.lora is None:
            raise ValueError("lora_request needs an engine started with enable_lora=True (--enable-lora)")
        if lora_request in self._checked_loras:
            return
        from sluice.lora.peft_config import read_peft_config
        read_peft_config(lora_request.lora_path, self.config.lora.max_lora_rank)
        self._checked_loras.add(lora_request)

    def _need_tokenizer(self, what: str, field: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{field}: {what} needs a tokenizer, but the engine runs with skip_tokenizer_init=True "
                             "(token ids only)")

    def _check_structured_outputs(self, params: SamplingParams) -> None:
        """Checks the constraint's syntax here (a ValueError naming the problem; a 400 on the server) and
        pins the backend that will compile it, so that the engine core compiles what was checked."""
        import dataclasses

        from sluice.structured_output import resolve_backend
        self._need_tokenizer("structured outputs", "structured_outputs")
        backend = resolve_backend(params.structured_outputs, self.config.structured_outputs.backend)
        params.structured_outputs = dataclasses.replace(params.structured_outputs, backend=backend)

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab_size = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range for vocab size {vocab_size}")
        # Only the prompt must fit: a request reaching max_model_len (KV-capped) stops there with "length".
        check_context_length(len(prompt_ids), None, self.max_model_len)
        params.verify()
        params.verify_max_logprobs(self.model_config.max_logprobs)
        params.verify_against_vocab(vocab_size)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        child_ids = self.output_processor.abort_requests(request_ids)
        self.engine_core.abort_requests(child_ids)

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.num_unfinished_requests

    # ---- the loop ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        step_start_time = time.monotonic()
        core_outputs: list[EngineCoreOutput] = self.engine_core.step()
        iteration_stats = IterationStats(step_start_time=step_start_time)
        outputs, stopped_ids = self.output_processor.process(core_outputs, iteration_stats)
        if stopped_ids:
            self.engine_core.stop_requests(stopped_ids)
        if self.stat_loggers:
            scheduler_stats = self.engine_core.make_stats()
            for stat_logger in self.stat_loggers:
                stat_logger.record(scheduler_stats, iteration_stats)
        return outputs

    # ---- chat --------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs: Any) -> list[int]:
        from sluice.tokenizer import apply_chat_template
        self._need_tokenizer("a chat", "messages")
        return apply_chat_template(self.tokenizer, messages, chat_template or self.chat_template,
                                   add_generation_prompt=add_generation_prompt, **kwargs)


def _stop_ids(hf_config: Any, tokenizer: Any, chat_template: str | None) -> tuple[int | None, list[int]]:
    """The model's eos id, and the further ids that also end generation: a list of eos ids (Llama 3 lists
    several) and the chat template's end-of-turn token. Without a tokenizer, the model config's alone."""
    from sluice.tokenizer import end_of_turn_token_ids

    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    extra: list[int] = []
    if isinstance(eos, (list, tuple)):
        eos, extra = (eos[0] if eos else None), list(eos[1:])
    if tokenizer is not None:
        extra += end_of_turn_token_ids(tokenizer, chat_template)
    return eos, sorted(set(extra) - {eos})
