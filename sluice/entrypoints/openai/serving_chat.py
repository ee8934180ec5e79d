"""POST /v1/chat/completions: messages -> chat template -> one engine request -> n choices.

Streams follow OpenAI: a first chunk per choice carrying ``role: assistant``, then content
deltas, the last one with ``finish_reason``, then (with include_usage) a usage chunk. With tools
(tool_calling.py), each choice's text goes through a ToolCallStreamer: content deltas, and per call a
chunk with its id and name, then chunks with fragments of its arguments.
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from sluice.engine.async_engine import RequestStream
from sluice.entrypoints.openai.errors import bad_request
from sluice.entrypoints.openai.protocol import (ChatChoice, ChatChoiceLogprobs, ChatCompletionRequest,
                                                ChatCompletionResponse, ChatCompletionStreamResponse,
                                                ChatMessage, ChatResponseMessage, ChatStreamChoice, DeltaMessage,
                                                UsageInfo)
from sluice.entrypoints.openai.sampling import (build_sampling_params, check_chat_only, check_common,
                                                check_context_length, check_logprobs)
from sluice.entrypoints.openai.serving_engine import (SSE_DONE, EnginePrompt, OpenAIServing, cancel_on_disconnect,
                                                      continuous_usage, engine_error_to_openai, merge_streams,
                                                      random_id, sse, usage_chunk)
from sluice.entrypoints.openai.tool_calling import (ToolPlan, apply_tool_plan, plan_tool_calls, template_message,
                                                    template_tools)
from sluice.entrypoints.openai.tool_parsers import ToolCallStreamer
from sluice.outputs import CompletionOutput, RequestOutput
from sluice.entrypoints.openai.render_pool import ChatRenderPool, TemplateRenderError
from sluice.tokenizer import CHAT_TEMPLATE_TIMEOUT_S, ChatTemplateLimitError, prepare_chat_render


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args: Any, render_pool: ChatRenderPool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.render_pool = render_pool

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Any:
        model = self.model_name(request.model)
        check_common(request, self.limits)
        check_chat_only(request)
        num_top = self._num_top_logprobs(request)
        plan = plan_tool_calls(request, self.config.tool_calls)
        prompt = EnginePrompt(None, await cancel_on_disconnect(raw_request, self.render_chat(
            request.messages, request.add_generation_prompt, request.chat_template, request.chat_template_kwargs,
            tools=template_tools(request.tools))))
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None \
            else request.max_tokens
        params = build_sampling_params(
            request, max_tokens=check_context_length(len(prompt.token_ids), max_tokens, self.limits),
            logprobs=num_top, prompt_logprobs=None, limits=self.limits)
        apply_tool_plan(plan, request, params)
        request_id = random_id("chatcmpl", self.config.api_server_index)
        streams = await self.add_prompts(request_id, [prompt], [params], request.priority,
                                              lora_request=self.lora_request(model))
        if request.stream:
            return StreamingResponse(self._stream(request, model, request_id, prompt, streams[0], num_top, plan),
                                     media_type="text/event-stream")
        final: RequestOutput | None = await cancel_on_disconnect(raw_request, _last_output(streams[0]))
        return JSONResponse(self._response(model, request_id, prompt, final, num_top, plan).model_dump())

    def _num_top_logprobs(self, request: ChatCompletionRequest) -> int | None:
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        check_logprobs(request.top_logprobs, self.limits, "top_logprobs")
        return (request.top_logprobs or 0) if request.logprobs else None

    async def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                          chat_template: str | None, template_kwargs: dict[str, Any] | None,
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Chat template -> text -> token ids; template failures are 400s. The messages are checked in the
        tokenizer pool, the template renders in a process of the render pool, the text is encoded in the
        tokenizer pool.

        A request's ``chat_template`` is Jinja text, never a path, and only with --trust-request-chat-template
        (a template runs code in the sandbox); any template renders within the time and size bounds of
        chat_render.py, the size being the longest prompt the server accepts."""
        if chat_template is not None and not self.config.trust_request_chat_template:
            raise bad_request("chat_template in a request is refused: this server uses its own template (start "
                              "it with --trust-request-chat-template to allow request templates)", "chat_template")
        conversation = [template_message(m, index) for index, m in enumerate(messages)]
        tokenizer = self.require_tokenizer("a chat", "messages")
        try:
            job = await self.run_in_tokenizer_pool(
                prepare_chat_render, tokenizer, conversation, chat_template or self.default_chat_template,
                add_generation_prompt, template_kwargs, tools)
            text = await self.render_pool.render(job, self.limits.max_prompt_chars, CHAT_TEMPLATE_TIMEOUT_S)
        except ChatTemplateLimitError as e:  # the template's own time or size bound
            raise bad_request(str(e), "chat_template") from None
        except TemplateRenderError as e:  # jinja2 errors from the template (user-supplied or the model's)
            raise bad_request(f"chat template error: {e}", "chat_template") from None
        except (ValueError, TypeError) as e:
            raise bad_request(f"could not apply the chat template: {e}", "messages") from None
        return await self.encode(text, add_special_tokens=False, param="messages")

    def _logprobs(self, completion: CompletionOutput, num_top: int | None) -> ChatChoiceLogprobs | None:
        if num_top is None:
            return None
        return self.chat_logprobs(completion.token_ids, completion.logprobs or [], num_top)

    def _response(self, model: str, request_id: str, prompt: EnginePrompt, final: RequestOutput,
                  num_top: int | None, plan: ToolPlan) -> ChatCompletionResponse:
        choices = []
        for c in sorted(final.outputs, key=lambda c: c.index):
            content, tool_calls = c.text, []
            if plan.parser is not None:
                content, tool_calls = plan.parser.extract_tool_calls(c.text, plan.max_calls)
            message = ChatResponseMessage(content=content, tool_calls=tool_calls)
            choices.append(ChatChoice(index=c.index, message=message, logprobs=self._logprobs(c, num_top),
                                      finish_reason=_finish_reason(c.finish_reason, bool(tool_calls), plan),
                                      stop_reason=c.stop_reason))
        num_generated = sum(len(c.token_ids) for c in final.outputs)
        usage = UsageInfo.of(len(prompt.token_ids), num_generated)
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    async def _stream(self, request: ChatCompletionRequest, model: str, request_id: str, prompt: EnginePrompt,
                      stream: RequestStream, num_top: int | None, plan: ToolPlan) -> AsyncIterator[str]:
        chunk = ChatCompletionStreamResponse(id=request_id, model=model, choices=[])
        streamers = {index: ToolCallStreamer(plan.parser, plan.max_calls)
                     for index in range(request.n)} if plan.parser is not None else {}
        finished: set[int] = set()
        num_generated = 0
        held: dict[int, tuple[list[int], list]] = {}  # per choice: tokens held back by its tool streamer

        def usage() -> UsageInfo:
            return UsageInfo.of(len(prompt.token_ids), num_generated)

        try:
            for index in range(request.n):
                role = ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
                yield sse(chunk.model_copy(update={"choices": [role], "usage": continuous_usage(request, usage)}))
            async for _, output in merge_streams([stream]):
                for c in output.outputs:
                    if c.index in finished or not (c.text or c.token_ids or c.finish_reason):
                        continue
                    if c.finish_reason is not None:
                        finished.add(c.index)
                    num_generated += len(c.token_ids)
                    deltas = [DeltaMessage(content=c.text)]
                    finish_reason = c.finish_reason
                    streamer = streamers.get(c.index)
                    if streamer is not None:
                        deltas = streamer.feed(c.text)
                        if c.finish_reason is not None:
                            deltas += streamer.finish()
                            finish_reason = _finish_reason(c.finish_reason, streamer.tools_called, plan)
                        if num_top is not None and (c.index in held or (not deltas and c.finish_reason is None)):
                            ids, logprobs = held.setdefault(c.index, ([], []))
                            ids += c.token_ids
                            logprobs += c.logprobs or []
                        if not deltas and c.finish_reason is None:
                            continue  # held back: it may be the start of a call; its logprobs go with the next
                        deltas = deltas or [DeltaMessage(content="")]
                        if c.index in held:
                            ids, logprobs = held.pop(c.index)
                            c = dataclasses.replace(c, token_ids=ids, logprobs=logprobs)
                    for number, delta in enumerate(deltas):
                        last = number == len(deltas) - 1
                        choice = ChatStreamChoice(index=c.index, delta=delta,
                                                  logprobs=self._logprobs(c, num_top) if number == 0 else None,
                                                  finish_reason=finish_reason if last else None,
                                                  stop_reason=c.stop_reason if last else None)
                        yield sse(chunk.model_copy(update={"choices": [choice],
                                                           "usage": continuous_usage(request, usage)}))
            final = usage_chunk(request, chunk, usage)
            if final is not None:
                yield final
        except Exception as e:  # noqa: BLE001 - after the 200 went out, errors travel as an event
            yield engine_error_to_openai(e).sse_event()
        yield SSE_DONE


def _finish_reason(engine_reason: str | None, tools_called: bool, plan: ToolPlan) -> str | None:
    """"tool_calls" when the model ended its turn with calls; a forced named function keeps "stop" (OpenAI's
    answer there) and a cut-off output keeps "length"."""
    if tools_called and engine_reason == "stop" and plan.choice in ("auto", "required"):
        return "tool_calls"
    return engine_reason


async def _last_output(stream: RequestStream) -> RequestOutput | None:
    final = None
    async for _, output in merge_streams([stream]):
        final = output
    return final
