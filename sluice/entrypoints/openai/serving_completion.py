"""POST /v1/completions: prompts (text, token ids, or lists of either) -> completions, streamed or not.

Choice ``index`` is ``prompt_index * n + completion_index``, as in OpenAI. With ``echo``
the prompt text (and, with ``logprobs``, the prompt's logprobs) precede the completion. With
``return_token_ids`` (vLLM's) a choice carries its generated ``token_ids`` (a stream's chunks: the new ones) and
its first one the ``prompt_token_ids``: how a server started with ``--skip-tokenizer-init`` answers token-id
prompts (its texts are empty, its logprob tokens read ``token_id:<id>``).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from sluice.engine.async_engine import RequestStream
from sluice.entrypoints.openai.errors import bad_request
from sluice.entrypoints.openai.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                                CompletionResponse, UsageInfo)
from sluice.entrypoints.openai.sampling import (build_sampling_params, check_common, check_context_length,
                                                check_logprobs)
from sluice.entrypoints.openai.serving_engine import (SSE_DONE, ChoiceState, EnginePrompt, OpenAIServing,
                                                      cancel_on_disconnect, continuous_usage,
                                                      engine_error_to_openai, merge_streams, random_id, sse,
                                                      usage_chunk)
from sluice.outputs import CompletionOutput, RequestOutput


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Any:
        model = self.model_name(request.model)
        check_common(request, self.limits)
        check_logprobs(request.logprobs, self.limits, "logprobs")
        if request.best_of is not None and request.best_of != request.n:
            raise bad_request("best_of other than n is not supported by sluice", "best_of")
        prompts = await cancel_on_disconnect(raw_request, self._engine_prompts(request.prompt, need_text=request.echo))
        echo_logprobs = request.logprobs if request.echo else None
        params = [build_sampling_params(
            request, max_tokens=check_context_length(len(p.token_ids), request.max_tokens, self.limits),
            logprobs=request.logprobs, prompt_logprobs=echo_logprobs, limits=self.limits) for p in prompts]
        request_id = random_id("cmpl", self.config.api_server_index)
        streams = await self.add_prompts(request_id, prompts, params, request.priority,
                                              lora_request=self.lora_request(model))
        if request.stream:
            return StreamingResponse(self._stream(request, model, request_id, prompts, streams),
                                     media_type="text/event-stream")
        finals = await cancel_on_disconnect(raw_request, _collect(streams))
        return JSONResponse(self._response(request, model, request_id, prompts, finals).model_dump())

    async def _engine_prompts(self, prompt: Any, need_text: bool) -> list[EnginePrompt]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if len(prompt) > self.limits.max_prompts:
            raise bad_request(f"a request may hold at most {self.limits.max_prompts} prompts, got {len(prompt)}",
                              "prompt")
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                prompts.append(EnginePrompt(item, await self.encode(item)))
            else:
                text = await self.decode(list(item), "echo", "echo") if need_text else None
                prompts.append(EnginePrompt(text, list(item)))
        return prompts

    # ---- one choice -------------------------------------------------------------------------------
    def _choice(self, request: CompletionRequest, prompt: EnginePrompt, output: RequestOutput,
                completion: CompletionOutput, index: int, state: ChoiceState) -> CompletionChoice | None:
        """The choice for this (delta or final) output, or None when it carries nothing new."""
        text, logprobs = completion.text, None
        echo_now = request.echo and not state.started
        if not (text or completion.token_ids or completion.finish_reason or echo_now):
            return None
        if request.logprobs is not None:
            logprobs = CompletionLogprobs()
            if echo_now:
                if output.prompt_logprobs is None:
                    raise bad_request("echo with logprobs needs prompt logprobs, which this engine does not "
                                      "produce yet; use echo or logprobs alone", "echo")
                logprobs = self.completion_logprobs(prompt.token_ids, output.prompt_logprobs, request.logprobs, 0)
            start = state.num_chars + (len(prompt.text or "") if echo_now else 0)
            generated = self.completion_logprobs(completion.token_ids, completion.logprobs or [],
                                                 request.logprobs, start)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(logprobs, name).extend(getattr(generated, name))
        token_ids = list(completion.token_ids) if request.return_token_ids else None
        prompt_token_ids = prompt.token_ids if request.return_token_ids and not state.started else None
        if echo_now:
            text = (prompt.text or "") + text
        state.started = True
        state.num_chars += len(text)
        state.num_tokens += len(completion.token_ids)
        state.finished = completion.finish_reason is not None
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=completion.finish_reason,
                                stop_reason=completion.stop_reason, prompt_token_ids=prompt_token_ids,
                                token_ids=token_ids)

    def _response(self, request: CompletionRequest, model: str, request_id: str, prompts: list[EnginePrompt],
                  finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        num_generated = 0
        for i, (prompt, output) in enumerate(zip(prompts, finals)):
            for completion in output.outputs:
                state = ChoiceState()
                choice = self._choice(request, prompt, output, completion, i * request.n + completion.index, state)
                if choice is not None:
                    choices.append(choice)
                num_generated += state.num_tokens
        choices.sort(key=lambda c: c.index)
        num_prompt = sum(len(p.token_ids) for p in prompts)
        usage = UsageInfo.of(num_prompt, num_generated)
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    async def _stream(self, request: CompletionRequest, model: str, request_id: str, prompts: list[EnginePrompt],
                      streams: list[RequestStream]) -> AsyncIterator[str]:
        states: dict[int, ChoiceState] = {}
        chunk = CompletionResponse(id=request_id, model=model, choices=[])

        def usage() -> UsageInfo:
            return UsageInfo.of(sum(len(p.token_ids) for p in prompts), sum(s.num_tokens for s in states.values()))

        try:
            async for i, output in merge_streams(streams):
                for completion in output.outputs:
                    index = i * request.n + completion.index
                    state = states.setdefault(index, ChoiceState())
                    if state.finished:
                        continue
                    choice = self._choice(request, prompts[i], output, completion, index, state)
                    if choice is not None:
                        yield sse(chunk.model_copy(update={"choices": [choice],
                                                           "usage": continuous_usage(request, usage)}))
            final = usage_chunk(request, chunk, usage)
            if final is not None:
                yield final
        except Exception as e:  # noqa: BLE001 - after the 200 went out, errors travel as an event
            yield engine_error_to_openai(e).sse_event()
        yield SSE_DONE


async def _collect(streams: list[RequestStream]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for i, output in merge_streams(streams):
        finals[i] = output
    return finals  # type: ignore[return-value]
