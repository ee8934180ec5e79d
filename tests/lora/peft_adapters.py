"""PEFT LoRA adapters for tiny test models, made and saved in the test (random non-zero A and B), and the
PEFT model's own greedy continuations (the reference sluice must match)."""
from __future__ import annotations

from pathlib import Path

import torch


def save_peft_adapter(base_path: str | Path, out_path: str | Path, rank: int, target_modules: list[str],
                      seed: int, prompts: list[list[int]] | None = None, max_new_tokens: int = 0,
                      **lora_kwargs) -> list[list[int]]:
    """Writes a PEFT LoRA checkpoint for the model at ``base_path``; returns the PEFT model's greedy
    continuations of ``prompts`` (float32, one prompt at a time)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=lora_kwargs.pop("lora_alpha", 2 * rank), lora_dropout=0.0,
                        target_modules=target_modules, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero: give both a real value
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(out_path)
    return greedy(peft_model, prompts, max_new_tokens) if prompts else []


def greedy(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import GenerationConfig

    model.eval()
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs
