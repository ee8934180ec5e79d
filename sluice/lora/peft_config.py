"""Reads and checks a PEFT LoRA checkpoint's adapter_config.json (no torch: the front end calls it).

What sluice applies: LoRA on the q/k/v/o and gate/up/down projections of the decoder layers, any rank up
to ``max_lora_rank``, scaling ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). Anything
else that would change the model's output is refused with a ValueError naming it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass(frozen=True, slots=True)
class PeftLoRAConfig:
    path: str
    rank: int
    scaling: float  # multiplies B @ A
    target_modules: tuple[str, ...]  # names of the projections (empty when given as a regex)


def read_peft_config(path: str, max_lora_rank: int) -> PeftLoRAConfig:
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ValueError(f"LoRA adapter {path!r}: no {CONFIG_NAME} (not a PEFT LoRA checkpoint folder)")
    if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        raise ValueError(f"LoRA adapter {path!r}: no {WEIGHTS_NAME}")
    with open(config_path) as f:
        config = json.load(f)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"LoRA adapter {path!r}: peft_type {peft_type!r} is not supported (only LORA)")
    unsupported = []
    if config.get("use_dora"):
        unsupported.append("use_dora (DoRA)")
    if config.get("modules_to_save"):
        unsupported.append(f"modules_to_save {config['modules_to_save']}")
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            unsupported.append(f"{key} {config[key]}")
    targets = config.get("target_modules") or ()
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    if not isinstance(targets, str):
        bad_targets = sorted(set(names) - set(SUPPORTED_TARGETS))
        if bad_targets:
            unsupported.append(f"target modules {bad_targets} (supported: {', '.join(SUPPORTED_TARGETS)})")
    if unsupported:
        raise ValueError(f"LoRA adapter {path!r} uses what sluice does not support: {'; '.join(unsupported)}")
    rank = int(config["r"])
    if not 1 <= rank <= max_lora_rank:
        raise ValueError(f"LoRA adapter {path!r}: rank {rank} is above max_lora_rank={max_lora_rank}")
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return PeftLoRAConfig(path, rank, scaling, () if isinstance(targets, str) else names)
