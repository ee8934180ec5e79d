"""LoRA adapters on the server (vLLM's interface): ``--lora-modules`` names them at start, a request's ``model``
field picks one, /v1/models lists them with the base model as ``parent``, and with runtime updates on
(``--enable-lora-runtime-updates`` or VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) /v1/load_lora_adapter and
/v1/unload_lora_adapter change the set. Unloading only forgets the name: requests already running with the
adapter keep it until they finish.

An adapter's id is a hash of its name and path, so that the API servers of ``--api-server-count N`` (each with
its own list) give one adapter the same id in their shared engine core.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from sluice.entrypoints.openai.errors import OpenAIError, bad_request
from sluice.entrypoints.openai.protocol import ModelCard
from sluice.lora.peft_config import read_peft_config
from sluice.lora.request import LoRARequest

RUNTIME_UPDATES_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


def parse_lora_module(text: str) -> dict[str, Any]:
    """``name=path`` or ``{"name": ..., "path": ..., "base_model_name": ...}``."""
    if text.lstrip().startswith("{"):
        module = json.loads(text)
        if not isinstance(module, dict) or not {"name", "path"} <= set(module):
            raise argparse.ArgumentTypeError(f"a JSON LoRA module needs name and path, got {text!r}")
        return module
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules takes name=path or JSON, got {text!r}")
    return {"name": name, "path": path}


def add_lora_args(group: Any) -> None:
    group.add_argument("--lora-modules", type=parse_lora_module, nargs="+", default=None,
                       help='LoRA adapters to serve (needs --enable-lora): name=path or JSON {"name": ..., '
                            '"path": ..., "base_model_name": ...}; a request\'s model field picks one')
    group.add_argument("--enable-lora-runtime-updates", action="store_true",
                       help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter (also with "
                            f"{RUNTIME_UPDATES_ENV}=True)")


def runtime_updates_enabled(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "enable_lora_runtime_updates", False)) or (
        os.environ.get(RUNTIME_UPDATES_ENV, "").lower() in ("1", "true"))


def lora_id(name: str, path: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}\0{path}".encode()).digest()[:4], "big") % (2**31 - 1) + 1


class LoRAModules:
    """The adapters this API server serves, by name."""

    def __init__(self, base_model_name: str, max_lora_rank: int) -> None:
        self.base_model_name = base_model_name
        self.max_lora_rank = max_lora_rank
        self.adapters: dict[str, LoRARequest] = {}

    def load(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        """Adds an adapter; a 400 for a taken name or a checkpoint sluice cannot serve."""
        if not name or not path:
            raise bad_request("lora_name and lora_path must not be empty", "lora_name")
        if name in self.adapters or name == self.base_model_name:
            raise bad_request(f"The lora adapter {name!r} has already been loaded.", "lora_name")
        try:
            read_peft_config(path, self.max_lora_rank)
        except (ValueError, OSError) as e:
            raise bad_request(str(e), "lora_path") from e
        request = LoRARequest(name, lora_id(name, path), path, base_model_name=base_model_name or self.base_model_name)
        self.adapters[name] = request
        return request

    def unload(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            raise OpenAIError(f"The lora adapter {name!r} cannot be found.", 404, "lora_name", "model_not_found")

    def get(self, name: str | None) -> LoRARequest | None:
        return self.adapters.get(name) if name is not None else None

    def cards(self, max_model_len: int) -> list[ModelCard]:
        return [ModelCard(id=name, root=request.lora_path, parent=request.base_model_name or self.base_model_name,
                          max_model_len=max_model_len) for name, request in self.adapters.items()]


def install_lora_routes(app: FastAPI, modules: LoRAModules) -> None:
    """The runtime-update routes (only when enabled, as vLLM)."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> Any:
        modules.load(request.lora_name, request.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> Any:
        modules.unload(request.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")
