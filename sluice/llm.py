"""LLM: the offline API, shaped like vLLM's (``LLM(...).generate(prompts, SamplingParams(...))``)."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from sluice.beam_search import BeamSearchOutput, beam_search
from sluice.config import EngineArgs
from sluice.engine.gc_heap import frozen_heap
from sluice.engine.llm_engine import LLMEngine, PromptType
from sluice.lora.request import LoRARequest
from sluice.outputs import RequestOutput
from sluice.pooling import EmbeddingRequestOutput, PoolingParams, PoolingRequestOutput
from sluice.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineArgs) if not f.name.startswith("_")}
_VLLM_ALIASES = {"num_gpu_blocks_override": "num_kv_blocks"}


class LLM:
    """Loads a model once and generates for batches of prompts with continuous batching.

    >>> llm = LLM(model="path/to/hf-folder-or.gguf", max_model_len=2048)
    >>> outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        kwargs = {_VLLM_ALIASES.get(k, k): v for k, v in kwargs.items()}
        unknown = sorted(set(kwargs) - _ENGINE_FIELDS)
        if unknown:
            raise TypeError(f"LLM() got unknown arguments: {', '.join(unknown)}")
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """``lora_request``: one adapter for every prompt, or one (or None: the base model) per prompt."""
        return self._run(_prompt_list(prompts), sampling_params, use_tqdm, priority, lora_request)

    def embed(self, prompts: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, use_tqdm: bool = True,
              truncate_prompt_tokens: int | None = None,
              priority: Sequence[int] | None = None) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (a pooling model: ``--runner pooling``, or a sentence-transformers folder).

        >>> LLM(model="path/to/Qwen3-Embedding").embed(["hello"])[0].outputs.embedding
        """
        outputs = self.encode(prompts, pooling_params, use_tqdm, truncate_prompt_tokens, priority)
        return [EmbeddingRequestOutput.from_base(output) for output in outputs]

    def encode(self, prompts: PromptType | Sequence[PromptType],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, use_tqdm: bool = True,
               truncate_prompt_tokens: int | None = None,
               priority: Sequence[int] | None = None) -> list[PoolingRequestOutput]:
        """The pooled vector of each prompt as ``outputs.data`` (a float32 tensor)."""
        prompts = _prompt_list(prompts)
        params = pooling_params if pooling_params is not None else PoolingParams()
        if truncate_prompt_tokens is not None:
            params = [dataclasses.replace(p, truncate_prompt_tokens=truncate_prompt_tokens)
                      for p in ([params] * len(prompts) if isinstance(params, PoolingParams) else params)]
        return self._run(prompts, params, use_tqdm, priority)

    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """The best ``params.beam_width`` sequences per prompt (vLLM's API; semantics in sluice/beam_search.py)."""
        return beam_search(self.llm_engine, prompts, params,
                           lambda batch, step_params: self.generate(batch, step_params, use_tqdm=False))

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, tools: list[dict] | None = None,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them, then generates.
        ``tools``: OpenAI function definitions ({"type": "function", "function": {...}}) for templates that
        show them to the model; the reply's tool calls are in its text (the server parses them)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if chat_template is not None:  # offline, a path to a template file is fine (the server never reads one)
            from sluice.tokenizer import get_chat_template
            chat_template = get_chat_template(self.llm_engine.tokenizer, chat_template)
        prompts = [{"prompt_token_ids": self.llm_engine.apply_chat_template(
            conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template, tools=tools,
            **template_kwargs)}
            for conv in conversations]
        return self._run(prompts, sampling_params, use_tqdm, None)

    def _run(self, prompts: list[PromptType], sampling_params: Any, use_tqdm: bool,
             priority: Sequence[int] | None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, (SamplingParams, PoolingParams)):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} sampling params")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(priority)} priorities")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_request = [lora_request] * len(prompts)
        if len(lora_request) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(lora_request)} LoRA requests")
        engine = self.llm_engine
        request_ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
                request_id = str(next(self._request_counter))
                # Offline, only the finished result is read: building a cumulative output for every
                # request at every step would be wasted work (vLLM does the same).
                params = params.clone()
                if isinstance(params, SamplingParams):
                    params.output_kind = RequestOutputKind.FINAL_ONLY
                engine.add_request(request_id, prompt, params, priority=priority[i] if priority else 0,
                                   lora_request=lora_request[i])
                request_ids.append(request_id)
            return self._run_engine(request_ids, use_tqdm)
        except BaseException:
            engine.abort_request(request_ids)  # never leave requests (and their KV blocks) behind
            raise

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        num_output_tokens = 0
        with frozen_heap():  # no 0.3 s collections of the start-up heap between steps
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if isinstance(output, RequestOutput):  # not an embedding
                            num_output_tokens += sum(len(c.token_ids) for c in output.outputs)
                        bar.update(1)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(f"output {num_output_tokens / elapsed:.1f} tok/s", refresh=False)
        bar.close()
        return [finished[r] for r in request_ids]


def _prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt (text, token ids or a dict) or a list of them -> a list."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)
