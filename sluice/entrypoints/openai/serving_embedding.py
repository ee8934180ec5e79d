"""POST /v1/embeddings (OpenAI's shape) on a pooling engine.

    {"model": "m", "input": "text" | ["a", "b"] | [1, 2, 3] | [[1, 2], [3]],
     "encoding_format": "float" | "base64", "dimensions": 256}
 -> {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...] | "<base64>"}],
     "model": "m", "usage": {"prompt_tokens": 5, "total_tokens": 5}}

``base64`` is the float32 little-endian bytes of the vector (what the openai client asks for by default
and decodes with numpy). ``dimensions`` is honoured for Matryoshka models only (a 400 otherwise). Besides
OpenAI's fields it takes vLLM's ``truncate_prompt_tokens``, ``add_special_tokens`` and ``normalize``.
A generation model answers 400 here, as an embedding model does on completions and chat (its engine
refuses SamplingParams: sluice/pooling/front.py).
"""
from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, StrictInt, StrictStr

from sluice.engine.async_engine import AsyncLLM
from sluice.entrypoints.openai.errors import bad_request
from sluice.entrypoints.openai.protocol import OpenAIBaseModel, UsageInfo
from sluice.entrypoints.openai.serving_engine import (EnginePrompt, OpenAIServing, ServingConfig,
                                                      cancel_on_disconnect, merge_streams, random_id)
from sluice.pooling import PoolingParams, PoolingRequestOutput


class EmbeddingRequest(OpenAIBaseModel):
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None  # accepted and ignored, as in OpenAI
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    add_special_tokens: bool = True
    normalize: bool | None = None


class EmbeddingData(OpenAIBaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingResponse(OpenAIBaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


class OpenAIServingEmbedding(OpenAIServing):
    async def create_embedding(self, request: EmbeddingRequest, raw_request: Request) -> Any:
        model = self.model_name(request.model)
        if self.engine.model_config.pooler_config is None:
            raise bad_request(f"model {model!r} is a generation model: it does not serve /v1/embeddings (start an "
                              "embedding model, or this one with --runner pooling)", "model")
        prompts = await self._engine_prompts(request.input, request.add_special_tokens)
        params = PoolingParams(dimensions=request.dimensions, normalize=request.normalize,
                               truncate_prompt_tokens=request.truncate_prompt_tokens)
        request_id = random_id("embd", self.config.api_server_index)
        streams = await self.add_prompts(request_id, prompts, [params] * len(prompts), priority=0)
        finals: list[PoolingRequestOutput | None] = [None] * len(prompts)

        async def collect() -> None:
            async for i, output in merge_streams(streams):
                finals[i] = output

        await cancel_on_disconnect(raw_request, collect())
        data = [EmbeddingData(index=i, embedding=_encode(output, request.encoding_format))
                for i, output in enumerate(finals)]
        num_prompt_tokens = sum(len(output.prompt_token_ids) for output in finals)
        usage = UsageInfo(prompt_tokens=num_prompt_tokens, total_tokens=num_prompt_tokens)
        return JSONResponse(EmbeddingResponse(id=request_id, model=model, data=data, usage=usage).model_dump())

    async def _engine_prompts(self, inputs: Any, add_special_tokens: bool) -> list[EnginePrompt]:
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs:
            raise bad_request("input must not be empty", "input")
        prompts = []
        for item in inputs:
            if isinstance(item, str):
                prompts.append(EnginePrompt(item, await self.encode(item, add_special_tokens=add_special_tokens)))
            else:
                prompts.append(EnginePrompt(None, list(item)))
        return prompts


def _encode(output: PoolingRequestOutput, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(output.vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    return output.vector.tolist()


def register_embedding_route(app: FastAPI, engine: AsyncLLM, config: ServingConfig,
                             tokenizer_pool: ThreadPoolExecutor) -> None:
    """Adds POST /v1/embeddings to the app (every engine has the route; a generation model answers 400)."""
    serving = OpenAIServingEmbedding(engine, config, tokenizer_pool)

    @app.post("/v1/embeddings")
    async def create_embedding(request: EmbeddingRequest, raw_request: Request) -> Any:
        return await serving.create_embedding(request, raw_request)
