"""Tiny Hugging Face checkpoints (model + tokenizer) written to a folder, for end-to-end tests.

Nothing is downloaded: configs are built in code, and the tokenizer is a small byte-level BPE
trained on a few sentences. `save_tiny_model` writes random (seeded) weights; `save_trained_tiny_model`
trains the tiny Llama for a few seconds on a copy task, so its greedy continuations have the wide
logit margins of a trained model (what reduced-precision agreement tests need).
"""
from __future__ import annotations

import random
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
    elif arch == "mixtral":  # mixture of experts: 6 experts, 2 per token, always renormalized
        cls = transformers.MixtralConfig
        base.update(sliding_window=None, num_local_experts=6, num_experts_per_tok=2, intermediate_size=40)
    elif arch == "qwen2_moe":  # 8 experts (4 per token, not renormalized) + a shared expert; layer 1 dense
        cls = transformers.Qwen2MoeConfig
        base.update(num_experts=8, num_experts_per_tok=4, moe_intermediate_size=40, norm_topk_prob=False,
                    shared_expert_intermediate_size=56, mlp_only_layers=[1])
    elif arch == "qwen3_moe":  # 8 experts, 3 per token, renormalized
        cls = transformers.Qwen3MoeConfig
        base.update(head_dim=16, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=40,
                    norm_topk_prob=True)
    elif arch == "qwen2":
        cls = transformers.Qwen2Config
    elif arch == "qwen3":
        cls = transformers.Qwen3Config
        base.update(head_dim=16)
    elif arch in ("gemma2", "gemma3"):
        # Windows shorter than the tests' prompts; caps low enough that they change the result.
        base.update(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, tie_word_embeddings=True,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"], num_hidden_layers=3,
                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
        cls = transformers.Gemma2Config
        if arch == "gemma3":
            cls = transformers.Gemma3TextConfig
            base.update(final_logit_softcapping=None, attn_logit_softcapping=None, architectures=["Gemma3ForCausalLM"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}})
    elif arch == "phi3":
        # longrope switching to its long factors at 32 positions; partial rotary dims (as Phi-4-mini)
        cls = transformers.Phi3Config
        base.update(pad_token_id=0, max_position_embeddings=128, original_max_position_embeddings=32,
                    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                     "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                     "long_factor": [1.0 + 1.5 * i for i in range(6)]})
    else:
        raise ValueError(arch)
    base.update(overrides)
    return cls(**base)


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, tokenizer: bool = True,
                    **overrides) -> Path:
    """Writes config.json, model.safetensors and (unless ``tokenizer=False``) the tokenizer; returns the folder."""
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
    if tokenizer:
        build_tokenizer().save_pretrained(path)
    return path


def hf_greedy(path: str | Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy generate, one prompt at a time (no padding), eos disabled."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # else transformers 5 falls back to it and stops at eos
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs


# The copy task: a random prefix, then a random pattern of COPY_PERIOD tokens repeated. Every token
# after the first period equals the token COPY_PERIOD positions back, so the model must attend to
# that position (a bigram table cannot do it) and, once trained, continues any such prompt by
# repeating its last COPY_PERIOD tokens with a wide margin. 7 is coprime to the tests' block sizes,
# so copy sources fall at every offset of a KV block.
COPY_PERIOD = 7
_FIRST_ORDINARY_ID = len(SPECIAL_TOKENS)  # patterns never contain bos / eos / chat markers


def copy_task_sequence(rng: random.Random, length: int, prefix_len: int = 0,
                       vocab_size: int = 384) -> list[int]:
    """`prefix_len` random tokens, then a random COPY_PERIOD-token pattern repeated up to `length`."""
    prefix = [rng.randrange(_FIRST_ORDINARY_ID, vocab_size) for _ in range(prefix_len)]
    pattern = [rng.randrange(_FIRST_ORDINARY_ID, vocab_size) for _ in range(COPY_PERIOD)]
    return (prefix + pattern * (length // COPY_PERIOD + 1))[:length]


def copy_task_prompts(seed: int = 0, vocab_size: int = 384) -> list[list[int]]:
    """16 prompts drawn like the training data, each holding at least one whole pattern. Lengths are
    mixed so long prompts prefill in chunks; the last three share a 48-token prefix (prefix cache hits)."""
    rng = random.Random(seed)
    prompts = []
    for length in (8, 9, 12, 16, 17, 20, 23, 31, 40, 50, 64, 90, 11):
        prefix_len = rng.randrange(0, min(16, length - COPY_PERIOD) + 1)
        prompts.append(copy_task_sequence(rng, length, prefix_len, vocab_size))
    shared = copy_task_sequence(rng, 48 + 16, rng.randrange(0, 17), vocab_size)
    return prompts + [shared[:48 + k] for k in (1, 9, 16)]


def _copy_task_batch(rng: random.Random, batch_size: int, seq_len: int,
                     vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-token targets); targets are -100 (ignored) where the context cannot tell them."""
    inputs = torch.empty(batch_size, seq_len, dtype=torch.long)
    targets = torch.full((batch_size, seq_len), -100, dtype=torch.long)
    for row in range(batch_size):
        prefix_len = rng.randrange(0, 17)
        sequence = torch.tensor(copy_task_sequence(rng, seq_len + 1, prefix_len, vocab_size))
        inputs[row] = sequence[:-1]
        first_copy = prefix_len + COPY_PERIOD  # first position whose token repeats an earlier one
        targets[row, first_copy - 1:] = sequence[first_copy:]
    return inputs, targets


def save_trained_tiny_model(path: str | Path, arch: str = "llama", steps: int = 300, seed: int = 0,
                            **overrides) -> Path:
    """Trains `tiny_config(arch)` on the copy task (Adam, CPU, seconds), then saves it like `save_tiny_model`."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    for _ in range(steps):
        inputs, targets = _copy_task_batch(rng, batch_size=16, seq_len=128, vocab_size=config.vocab_size)
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


HERMES_TEMPLATE = (  # Qwen 2.5's layout, shortened: tools in the system turn, calls in <tool_call> tags
    "{%- if tools %}<|im_start|>system\n# Tools\n\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}\n"
    "{%- endfor %}\n</tools>\n\nFor each function call, return a json object within <tool_call></tool_call> "
    "XML tags.<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content }}"
    "{%- for call in message.tool_calls | default([]) %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_scripted_tiny_model(path: str | Path, reply: list[str], chat_template: str = CHATML_TEMPLATE,
                             special: frozenset[str] = frozenset()) -> Path:
    """A tiny Llama whose greedy (and, by its margins, any-temperature) reply to every chat is ``reply``, then eos.
    The pieces in ``special`` are special tokens (skipped by skip_special_tokens).

    Each piece of ``reply`` becomes a token of its own (added to the tokenizer), and the model is a bigram table:
    every layer's output projections are zero, so the last hidden state is the current token's embedding, and
    lm_head maps the embedding of each token of the chain (the prompt's last token, then the pieces) onto the
    next one with a margin of 80 logits."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template
    if len(set(reply)) != len(reply):
        raise ValueError("each piece of the reply must be distinct (the model is a bigram table)")
    tokenizer.add_tokens([AddedToken(piece, normalized=False, special=piece in special) for piece in reply])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    chain = [tokenizer.encode(prompt, add_special_tokens=False)[-1]]
    chain += [tokenizer.convert_tokens_to_ids(piece) for piece in reply] + [tokenizer.eos_token_id]
    config = tiny_config("llama", max_position_embeddings=2048)  # tool schemas make long prompts
    assert len(chain) <= config.hidden_size and len(tokenizer) <= config.vocab_size
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")) or name == "lm_head.weight":
                p.zero_()
            elif p.dim() > 1:
                p.normal_(0.0, 0.08)
        for slot, (token, next_token) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token] = 0.0
            model.model.embed_tokens.weight[token, slot] = 1.0
            model.lm_head.weight[next_token, slot] = 10.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
