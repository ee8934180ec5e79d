"""Tiny random Hugging Face checkpoints (model + tokenizer) written to a folder, for end-to-end tests.

Nothing is downloaded: configs are built in code, weights are random (seeded), and the
tokenizer is a small byte-level BPE trained on a few sentences.
"""
from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Continuous batching schedules every iteration under a token budget.",
    "héllo wörld, 日本語のテキスト, emoji 🙂 and numbers 12345.",
    "def main():\n    print('hello world')\n",
] * 4

SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", chat_template=CHATML_TEMPLATE)


def tiny_config(arch: str, **overrides):
    """Small configs with deliberately odd shapes (3 KV heads, head_dim 16)."""
    import transformers

    base = dict(vocab_size=384, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=512,
                rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    if arch == "llama":
        base.update(num_key_value_heads=2, num_attention_heads=4, hidden_size=64, intermediate_size=128)
        cls = transformers.LlamaConfig
    elif arch == "mistral":
        cls = transformers.MistralConfig
        base.update(sliding_window=None)
    elif arch == "qwen2":
        cls = transformers.Qwen2Config
    elif arch == "qwen3":
        cls = transformers.Qwen3Config
        base.update(head_dim=16)
    else:
        raise ValueError(arch)
    base.update(overrides)
    return cls(**base)


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Writes config.json, model.safetensors and the tokenizer; returns the folder."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), torch_dtype=torch.float32)
    # Random init is tiny; widen it so greedy paths are not dominated by ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def hf_greedy(path: str | Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy generate, one prompt at a time (no padding), eos disabled."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs
