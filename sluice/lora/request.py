"""LoRARequest: which adapter a request runs with (vLLM's names and fields)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """``lora_int_id`` (>= 1) identifies the adapter everywhere in the engine: slot assignment, the prefix
    cache's block hashes and scheduling; two requests with the same id share one loaded adapter.
    ``lora_path``: a PEFT checkpoint folder (adapter_config.json + adapter_model.safetensors)."""
    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = field(default=None, kw_only=True)  # keyword only, as in vLLM

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be at least 1 (0 is the base model), got {self.lora_int_id}")

    def as_tuple(self) -> tuple[str, int, str, str | None]:
        """The fields, in order (what crosses the process split; ``from_tuple`` reads it)."""
        return (self.lora_name, self.lora_int_id, self.lora_path, self.base_model_name)

    @classmethod
    def from_tuple(cls, fields: tuple[str, int, str, str | None] | list) -> "LoRARequest":
        name, lora_int_id, path, base_model_name = fields
        return cls(name, lora_int_id, path, base_model_name=base_model_name)
