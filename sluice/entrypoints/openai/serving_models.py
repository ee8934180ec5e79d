"""GET /v1/models, POST /tokenize, POST /detokenize (vLLM's shapes)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from sluice.engine.async_engine import AsyncLLM
from sluice.entrypoints.openai.errors import bad_request
from sluice.entrypoints.openai.protocol import (DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
                                                TokenizeRequest, TokenizeResponse)
from sluice.entrypoints.openai.serving_chat import OpenAIServingChat
from sluice.entrypoints.openai.serving_engine import OpenAIServing, ServingConfig
from sluice.entrypoints.openai.tool_calling import template_tools


class OpenAIServingModels(OpenAIServing):
    """Model listing and the tokenizer endpoints; /tokenize renders chats with the chat handler's renderer."""

    def __init__(self, engine: AsyncLLM, config: ServingConfig, tokenizer_pool: ThreadPoolExecutor,
                 chat: OpenAIServingChat) -> None:
        super().__init__(engine, config, tokenizer_pool)
        self.chat = chat

    def list_models(self) -> ModelList:
        root = self.engine.model_config.model
        cards = [ModelCard(id=name, root=root, max_model_len=self.limits.max_model_len)
                 for name in self.config.served_model_names]
        if self.config.lora_modules is not None:
            cards += self.config.lora_modules.cards(self.limits.max_model_len)
        return ModelList(data=cards)

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.model_name(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if request.prompt is not None:
            tokens = await self.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        else:
            tokens = await self.chat.render_chat(request.messages, request.add_generation_prompt, None, None,
                                                 tools=template_tools(request.tools))
        return TokenizeResponse(count=len(tokens), max_model_len=self.limits.max_model_len, tokens=tokens)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.model_name(request.model)
        bad = [t for t in request.tokens if not 0 <= t < self.limits.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of range for vocab size {self.limits.vocab_size}", "tokens")
        text = await self.decode(request.tokens, "/detokenize", "tokens")
        return DetokenizeResponse(prompt=text)
