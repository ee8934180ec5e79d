"""GGUF models through the whole engine: the embedded default model answers, and a GGUF file gives the
same greedy output as the same weights from safetensors."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from transformers import LlamaForCausalLM

from sluice import LLM, SamplingParams
from sluice.models.default_model import default_model_path
from sluice.models.gguf_loader import GGUFCheckpoint
from tests.models.test_gguf_loader import F16, F32, default_tensor_type, tiny_llama, write_llama_gguf

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def _snap_to_gguf_grid(model: LlamaForCausalLM) -> None:
    """Rounds every weight to what its GGUF type can hold, so writing the file loses nothing."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            qtype = default_tensor_type(name)
            values = tensor.float().numpy()
            if qtype == F16:
                snapped = values.astype(np.float16).astype(np.float32)
            elif qtype != F32:
                snapped = dequantize(quantize(values, qtype), qtype).reshape(values.shape)
            else:
                continue
            tensor.copy_(torch.from_numpy(snapped))


def test_tiny_gguf_gives_the_same_greedy_output_as_safetensors(tmp_path):
    model = tiny_llama(seed=3)
    _snap_to_gguf_grid(model)
    gguf_path = write_llama_gguf(tmp_path / "tiny.gguf", model)  # Q8_0, F16 and F32 tensors
    model.save_pretrained(tmp_path / "hf")
    prompts = [{"prompt_token_ids": list(range(10 + i, 30 + 3 * i))} for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    from_gguf = LLM(model=gguf_path, dtype="float32").generate(prompts, params, use_tqdm=False)
    from_safetensors = LLM(model=str(tmp_path / "hf"), tokenizer=gguf_path, dtype="float32").generate(
        prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in from_gguf] == [o.outputs[0].token_ids for o in from_safetensors]
    assert all(len(o.outputs[0].token_ids) == 16 for o in from_gguf)


@pytest.fixture(scope="module")
def default_llm() -> LLM:
    return LLM(dtype="float32", max_model_len=512)


def test_default_model_answers_the_capital_of_france(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}], GREEDY,
                           use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended on the template's end-of-turn token
    assert "<|im_end|>" not in out.text


def test_chat_shows_tools_to_a_template_that_renders_them(default_llm):
    """``LLM.chat(tools=...)`` passes the function definitions to the template, as the server's ``tools`` does."""
    template = ("{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    tokenizer = default_llm.get_tokenizer()
    with_tools = default_llm.chat(messages, params, use_tqdm=False, chat_template=template, tools=tools)[0]
    assert with_tools.prompt_token_ids == tokenizer.encode(
        "TOOL get_weather\nuser: Weather in Paris?\nassistant:", add_special_tokens=False)
    without = default_llm.chat(messages, params, use_tqdm=False, chat_template=template)[0]
    assert tokenizer.decode(without.prompt_token_ids) == "user: Weather in Paris?\nassistant:"


def test_default_model_logits_match_transformers(default_llm):
    """Prompt logprobs from sluice equal log_softmax of transformers' forward on the same GGUF weights."""
    checkpoint = GGUFCheckpoint(default_model_path())
    hf_model = LlamaForCausalLM(checkpoint.hf_config).eval()
    hf_model.load_state_dict(dict(checkpoint.weights()), strict=False)
    hf_model.tie_weights()
    for text in ("The capital of France is", "def fibonacci(n):\n    return"):
        ids = default_llm.get_tokenizer().encode(text)
        out = default_llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                   use_tqdm=False)[0]
        with torch.no_grad():
            want = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
        got = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
        expected = [want[i - 1, ids[i]].item() for i in range(1, len(ids))]
        np.testing.assert_allclose(got, expected, atol=2e-3)


def _sluice(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "sluice.entrypoints.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env)


def test_sluice_generate_continues_with_paris():
    result = _sluice("generate", "The capital of France is", "--max-tokens", "8", "--max-model-len", "256")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "KV cache" in result.stderr  # start-up says what was loaded


def test_sluice_chat_answers_from_piped_stdin():
    result = _sluice("chat", "--max-tokens", "32", "--max-model-len", "512",
                     stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.parametrize("make_path, message", [
    (lambda tmp: str(tmp / "missing.gguf"), "does not exist"),
    (lambda tmp: (tmp / "notes.gguf").write_text("not a gguf") and str(tmp / "notes.gguf"), "GGUF"),
])
def test_bad_model_paths_give_one_line_errors(tmp_path, make_path, message):
    result = _sluice("generate", "hi", "--model", make_path(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert message in result.stderr
