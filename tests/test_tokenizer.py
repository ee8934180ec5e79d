"""Tokenizers from a GGUF or an HF folder, chat templates, and the token a chat turn ends on."""
from __future__ import annotations

import pytest
from tokenizers import AddedToken

from sluice.models.default_model import default_model_path
from sluice.tokenizer import apply_chat_template, end_of_turn_token_ids, get_chat_template, get_tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def gguf_tokenizer():
    return get_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def hf_folder(gguf_tokenizer, tmp_path_factory) -> str:
    """The same tokenizer saved as an HF folder (tokenizer.json, tokenizer_config.json, chat template)."""
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    gguf_tokenizer.save_pretrained(folder)
    return str(folder)


def test_gguf_tokenizer_encodes_like_smollm2(gguf_tokenizer):
    # ids from transformers' own GGUF tokenizer for SmolLM2 (byte-level BPE, no BOS added)
    assert gguf_tokenizer.encode("Hello world, how are you?") == [19556, 905, 28, 638, 359, 346, 47]
    assert gguf_tokenizer.eos_token == "<|im_end|>" and gguf_tokenizer.eos_token_id == 2
    assert gguf_tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert len(gguf_tokenizer) == 49152


@pytest.mark.parametrize("text", ["The capital of France is", "  leading spaces\tand tabs\n", "naïve café 東京 🙂"])
def test_gguf_tokenizer_round_trips_text(gguf_tokenizer, text):
    assert gguf_tokenizer.decode(gguf_tokenizer.encode(text)) == text


def test_special_tokens_stay_whole(gguf_tokenizer):
    ids = gguf_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2


def test_chatml_template_from_the_gguf(gguf_tokenizer):
    text = apply_chat_template(gguf_tokenizer, QUESTION, tokenize=False)
    assert text == (f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = apply_chat_template(gguf_tokenizer, QUESTION)
    assert ids == gguf_tokenizer.encode(text, add_special_tokens=False) and ids[0] == 1  # no extra BOS


def test_without_generation_prompt_the_prompt_ends_after_the_last_turn(gguf_tokenizer):
    text = apply_chat_template(gguf_tokenizer, QUESTION, add_generation_prompt=False, tokenize=False)
    assert text.endswith("What is the capital of France?<|im_end|>\n")


def test_chatml_turn_ends_on_im_end(gguf_tokenizer):
    assert end_of_turn_token_ids(gguf_tokenizer) == [gguf_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_hf_folder_tokenizer_and_template_match_the_gguf(gguf_tokenizer, hf_folder):
    folder_tokenizer = get_tokenizer(hf_folder)
    assert folder_tokenizer.encode("Hello world, how are you?") == [19556, 905, 28, 638, 359, 346, 47]
    assert apply_chat_template(folder_tokenizer, QUESTION) == apply_chat_template(gguf_tokenizer, QUESTION)


def test_tokenizer_path_overrides_model_path(hf_folder, tmp_path):
    tokenizer = get_tokenizer(str(tmp_path / "weights-only.gguf"), tokenizer_path=hf_folder)
    assert tokenizer.eos_token == "<|im_end|>"


def test_explicit_template_text_or_file_wins(gguf_tokenizer, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert apply_chat_template(gguf_tokenizer, QUESTION, template, tokenize=False) == \
        "[user] What is the capital of France?\n"
    path = tmp_path / "chat_template.jinja"
    path.write_text(template)
    assert get_chat_template(gguf_tokenizer, str(path)) == template


def test_llama3_style_turn_ends_on_eot_id(hf_folder):
    tokenizer = get_tokenizer(hf_folder)  # fresh: this test adds tokens
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False)
                          for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")])
    eot_id = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn_token_ids(tokenizer, LLAMA3_TEMPLATE) == [eot_id]
    assert apply_chat_template(tokenizer, QUESTION, LLAMA3_TEMPLATE)[-2:] == \
        tokenizer.encode("<|end_header_id|>\n\n", add_special_tokens=False)


def test_template_without_end_token_gives_no_extra_stop_ids(gguf_tokenizer):
    assert end_of_turn_token_ids(gguf_tokenizer, "{% for m in messages %}{{ m['content'] }}{% endfor %}") == []


def test_model_without_template_is_a_clear_error(hf_folder):
    tokenizer = get_tokenizer(hf_folder)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        apply_chat_template(tokenizer, QUESTION)
    assert end_of_turn_token_ids(tokenizer) == []


def test_bad_messages_are_named(gguf_tokenizer):
    with pytest.raises(ValueError, match="messages"):
        apply_chat_template(gguf_tokenizer, [])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        apply_chat_template(gguf_tokenizer, [{"content": "no role"}])


def test_missing_tokenizer_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        get_tokenizer(str(tmp_path / "missing.gguf"))
