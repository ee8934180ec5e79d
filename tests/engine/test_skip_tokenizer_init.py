"""skip_tokenizer_init: a model folder with no tokenizer runs in token ids (vLLM's flag).

Token-id prompts in; outputs carry the token ids and empty text. Anything that needs a tokenizer (a text
prompt, a chat, stop strings, bad words) is a ValueError naming the field. Without the flag, a folder with no
tokenizer files fails at start-up with one line naming the folder and the flag.
"""
from __future__ import annotations

import random

import pytest

from sluice import LLM, SamplingParams
from tests.engine.test_hf_equivalence import assert_no_leaked_blocks
from tests.tiny_models import hf_greedy, save_tiny_model

MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """A tiny Llama saved with config.json and weights only; its prompts and transformers' greedy outputs."""
    path = save_tiny_model(tmp_path_factory.mktemp("no_tokenizer") / "llama", tokenizer=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 384) for _ in range(n)] for n in (1, 5, 17, 40)]
    return path, prompts, hf_greedy(path, prompts, MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def llm(bare_model):
    path, _, _ = bare_model
    return LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", device="cpu", max_model_len=128,
               max_num_batched_tokens=16, block_size=4)


def test_token_id_prompts_give_transformers_greedy_tokens_and_empty_text(bare_model, llm):
    _, prompts, expected = bare_model
    assert llm.get_tokenizer() is None
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output, want in zip(prompts, outputs, expected):
        assert output.prompt is None and output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == want
        assert output.outputs[0].text == ""
        assert output.outputs[0].finish_reason == "length"
    assert_no_leaked_blocks(llm)


def test_logprobs_and_n_work_without_a_tokenizer(bare_model, llm):
    _, prompts, expected = bare_model
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2, n=2)
    [output] = llm.generate({"prompt_token_ids": prompts[1]}, params, use_tqdm=False)
    for completion in output.outputs:
        assert completion.token_ids == expected[1][:4] and completion.text == ""
        assert all(step[t].decoded_token is None for step, t in zip(completion.logprobs, completion.token_ids))
    assert_no_leaked_blocks(llm)


@pytest.mark.parametrize("prompt, params, field", [
    ("a text prompt", SamplingParams(max_tokens=2), "prompt"),
    ({"prompt": "a text prompt"}, SamplingParams(max_tokens=2), "prompt"),
    ({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2, stop=["x"]), "stop"),
    ({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2, bad_words=["x"]), "bad_words"),
])
def test_what_needs_a_tokenizer_is_a_clear_value_error(llm, prompt, params, field):
    with pytest.raises(ValueError, match=rf"^{field}: .*needs a tokenizer.*skip_tokenizer_init=True"):
        llm.generate(prompt, params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_chat_needs_a_tokenizer(llm):
    with pytest.raises(ValueError, match=r"^messages: a chat needs a tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)


def test_a_folder_without_tokenizer_files_and_without_the_flag_fails_at_start_with_one_line(bare_model):
    path, _, _ = bare_model
    with pytest.raises(ValueError) as error:
        LLM(model=str(path), dtype="float32", device="cpu")
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message and "--skip-tokenizer-init" in message and "skip_tokenizer_init=True" in message
