"""On CUDA: models build straight onto the GPU, run with the Triton backend in bf16, and agree with
the float32 CPU reference. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sluice.attention import get_attention_backend
from sluice.attention.torch_ref import TorchRefBackend
from sluice.layers.attention import bind_kv_cache
from sluice.models.loader import build_model, iterate_safetensors, load_hf_config
from tests.models.paged_batch import StepRequest, allocate_kv_caches, build_step, scrambled_block_ids
from tests.tiny_models import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BLOCK_SIZE = 16


@torch.no_grad()
def _logits(model: torch.nn.Module, requests: list[StepRequest], device: str) -> torch.Tensor:
    bind_kv_cache(model, allocate_kv_caches(model, num_blocks=16, block_size=BLOCK_SIZE))
    input_ids, positions, metadata = build_step(requests, BLOCK_SIZE, device)
    return model.compute_logits(model(input_ids, positions, metadata)).cpu()


# name -> (family, config overrides): windows (8) shorter than the 40- and 17-token prompts
CUDA_CASES = {"llama": ("llama", {}), "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}), "gemma2": ("gemma2", {}),
              "gemma3": ("gemma3", {}), "phi3": ("phi3", {}), "mistral_window": ("mistral", {"sliding_window": 8})}


@pytest.mark.parametrize("case", list(CUDA_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_matches_cpu_reference(case, dtype, tmp_path):
    family, overrides = CUDA_CASES[case]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).save_pretrained(tmp_path)
    config = load_hf_config(tmp_path)
    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in (40, 3, 17)]
    blocks = scrambled_block_ids(3, 3, 16)
    requests = [StepRequest(p, 0, len(p), b) for p, b in zip(prompts, blocks)]

    reference = build_model(config, torch.float32, "cpu", TorchRefBackend(), iterate_safetensors(tmp_path))
    model = build_model(config, dtype, "cuda", get_attention_backend("cuda"), iterate_safetensors(tmp_path))
    assert all(p.device.type == "cuda" and p.dtype == dtype for p in model.parameters())
    expected, actual = _logits(reference, requests, "cpu"), _logits(model, requests, "cuda")
    assert actual.dtype == torch.float32
    error = (actual - expected).norm() / expected.norm()
    assert error < (1e-4 if dtype == torch.float32 else 3e-2), f"relative error {error:.2e}"


def test_dummy_weights_on_cuda_are_seeded():
    config = tiny_config("llama")
    first = build_model(config, torch.bfloat16, "cuda", get_attention_backend("cuda"), load_format="dummy", seed=3)
    again = build_model(config, torch.bfloat16, "cuda", get_attention_backend("cuda"), load_format="dummy", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
    assert all(p.device.type == "cuda" for p in first.parameters())
