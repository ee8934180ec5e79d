"""GGUF loading: config from metadata, dequantized weights under HF names, Q/K un-permuted, clear errors.

``write_llama_gguf`` and ``tiny_llama`` are reusable by engine tests (same weights from safetensors and GGUF):
the writer does what llama.cpp's convert_hf_to_gguf does for a llama model, including the Q/K row permutation.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sluice.models.default_model import default_model_path
from sluice.models.gguf_loader import GGUFCheckpoint, gguf_to_hf_name, llama3_freq_factors, open_gguf

Q8_0, F16, F32 = GGMLQuantizationType.Q8_0, GGMLQuantizationType.F16, GGMLQuantizationType.F32

CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]


def tiny_vocab() -> list[str]:
    """Byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, and the products of MERGES."""
    byte_symbols = list(bytes_to_unicode().values())
    return SPECIAL_TOKENS + byte_symbols + [m.replace(" ", "") for m in MERGES]


def tiny_llama(seed: int = 0, tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    """hidden 64, 2 layers, 4 heads, 2 KV heads, random weights (norms too, so a swap would show)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tiny_vocab()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    return model


def _hf_to_gguf_name(hf_name: str, num_layers: int) -> str:
    suffix = hf_name.rsplit(".", 1)[1]
    for layer in range(num_layers):
        for gguf_module in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                            "attn_norm", "ffn_norm"):
            candidate = f"blk.{layer}.{gguf_module}.{suffix}"
            if gguf_to_hf_name(candidate) == hf_name:
                return candidate
    for module in ("token_embd", "output_norm", "output"):
        if gguf_to_hf_name(f"{module}.{suffix}") == hf_name:
            return f"{module}.{suffix}"
    raise KeyError(hf_name)


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's ``permute`` (already given n_head_kv for K): rotary halves -> interleaved rows."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def finish_gguf(writer: GGUFWriter) -> str:
    """Write out everything added to ``writer``; returns the file's path."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(writer.path)


def default_tensor_type(hf_name: str) -> GGMLQuantizationType:
    """Mixed like real files: norms F32, q/v/gate/down/embeddings Q8_0, the rest F16."""
    if hf_name.endswith("norm.weight"):
        return F32
    if any(part in hf_name for part in ("q_proj", "v_proj", "gate_proj", "down_proj", "embed_tokens")):
        return Q8_0
    return F16


def write_llama_gguf(path: str | os.PathLike[str], model: LlamaForCausalLM,
                     tensor_type=default_tensor_type, architecture: str = "llama") -> str:
    """Write ``model`` as llama.cpp would: GGUF names, Q/K permuted (llama only), quantized per
    ``tensor_type(hf_name)``, with the tiny byte-level BPE tokenizer and a ChatML template. Returns the path."""
    permute = architecture == "llama"
    config = model.config
    writer = GGUFWriter(os.fspath(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    vocab = tiny_vocab()
    writer.add_token_list(vocab)
    writer.add_token_types([TokenType.CONTROL if t in SPECIAL_TOKENS else TokenType.NORMAL for t in vocab])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        values = tensor.detach().float().numpy()
        if permute and "q_proj" in hf_name:
            values = llama_cpp_permute(values, config.num_attention_heads)
        elif permute and "k_proj" in hf_name:
            values = llama_cpp_permute(values, config.num_key_value_heads)
        qtype = tensor_type(hf_name)
        data = values if qtype == F32 else values.astype(np.float16) if qtype == F16 else quantize(values, qtype)
        writer.add_tensor(_hf_to_gguf_name(hf_name, config.num_hidden_layers), data,
                          raw_dtype=None if qtype in (F32, F16) else qtype)
    return finish_gguf(writer)


# ---- a tiny file written here ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[LlamaForCausalLM, GGUFCheckpoint]:
    model = tiny_llama()
    path = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", model)
    return model, GGUFCheckpoint(path)


def test_config_is_read_from_metadata(tiny):
    model, ckpt = tiny
    got, want = ckpt.hf_config, model.config
    assert ckpt.architecture == "llama" and got.architectures == ["LlamaForCausalLM"]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps)
    assert got.rope_parameters["rope_theta"] == pytest.approx(10000.0)
    assert got.tie_word_embeddings is False  # the file has output.weight


def test_weights_round_trip_under_hf_names(tiny):
    model, ckpt = tiny
    original = model.state_dict()
    loaded = dict(ckpt.weights())
    assert set(loaded) == set(original)
    for name, tensor in loaded.items():
        want = original[name]
        assert tensor.shape == want.shape and tensor.dtype == torch.float32, name
        qtype = default_tensor_type(name)
        if qtype == F32:
            assert torch.equal(tensor, want), name
        elif qtype == F16:  # f16 -> f32 is exact
            assert torch.equal(tensor, want.half().float()), name
        else:  # Q8_0: one f16 scale per 32 values, int8 steps of amax/127
            step = want.abs().max() / 127
            assert (tensor - want).abs().max() <= step, name


def test_qk_rows_are_unpermuted_exactly(tiny):
    model, ckpt = tiny
    loaded = dict(ckpt.weights())
    k_name = "model.layers.1.self_attn.k_proj.weight"  # F16: exact, so any row order error shows
    assert torch.equal(loaded[k_name], model.state_dict()[k_name].half().float())
    q_name = "model.layers.0.self_attn.q_proj.weight"
    permuted = torch.from_numpy(llama_cpp_permute(model.state_dict()[q_name].numpy(), 4))
    assert (loaded[q_name] - model.state_dict()[q_name]).abs().max() < (loaded[q_name] - permuted).abs().max()


def test_weights_convert_to_requested_dtype(tiny):
    _, ckpt = tiny
    name, tensor = next(iter(ckpt.weights(dtype=torch.bfloat16)))
    assert tensor.dtype == torch.bfloat16


def test_tied_embeddings_when_file_has_no_output_tensor(tmp_path):
    model = tiny_llama(seed=1, tie_word_embeddings=True)
    ckpt = GGUFCheckpoint(write_llama_gguf(tmp_path / "tied.gguf", model))
    assert ckpt.hf_config.tie_word_embeddings is True
    assert "lm_head.weight" not in dict(ckpt.weights())


def test_tokenizer_and_chat_template_come_from_the_file(tiny):
    _, ckpt = tiny
    tokenizer = ckpt.tokenizer()
    assert ckpt.chat_template == CHATML_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token_id == 1
    vocab = tiny_vocab()
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("hello world", add_special_tokens=False)) == \
        ["hell", "o", "Ġw", "o", "r", "l", "d"]
    ids = tokenizer.encode("<|im_start|>hello<|im_end|>", add_special_tokens=False)
    assert ids[0] == vocab.index("<|im_start|>") and ids[-1] == vocab.index("<|im_end|>")
    assert tokenizer.decode(tokenizer.encode("héllo, wörld", add_special_tokens=False)) == "héllo, wörld"


def test_qwen2_file_keeps_qk_order_and_biases(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tiny_vocab()), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    ckpt = GGUFCheckpoint(write_llama_gguf(tmp_path / "qwen2.gguf", model, lambda name: F32, "qwen2"))
    assert ckpt.hf_config.architectures == ["Qwen2ForCausalLM"] and ckpt.hf_config.model_type == "qwen2"
    loaded = dict(ckpt.weights())
    original = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(loaded) == set(original) and "model.layers.0.self_attn.q_proj.bias" in loaded
    for name, tensor in loaded.items():
        assert torch.equal(tensor, original[name]), name


# ---- the embedded default model against transformers' own GGUF loading ----

@pytest.fixture(scope="module")
def default_checkpoint() -> GGUFCheckpoint:
    return GGUFCheckpoint(default_model_path())


def transformers_gguf_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The float32 state dict transformers' ``from_pretrained(folder, gguf_file=name)`` loads.

    transformers refuses GGUF without ``accelerate`` installed, although loading onto the CPU never uses it;
    the check is bypassed rather than adding a dependency.
    """
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM

    folder, filename = os.path.split(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_utils, "is_accelerate_available", lambda *args, **kwargs: True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    return model.state_dict()


def test_default_model_config(default_checkpoint):
    config = default_checkpoint.hf_config
    assert default_checkpoint.architecture == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings is True and config.max_position_embeddings == 8192
    assert config.rope_parameters["rope_theta"] == pytest.approx(100000.0)


@pytest.mark.slow
def test_default_model_weights_match_transformers_gguf_loading(default_checkpoint):
    reference = transformers_gguf_state_dict(default_checkpoint.path)
    loaded = dict(default_checkpoint.weights())
    assert set(reference) - set(loaded) == {"lm_head.weight"}  # tied: transformers lists it, the file has none
    assert set(loaded) <= set(reference)
    for name, tensor in loaded.items():
        assert tensor.shape == reference[name].shape, name
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-6, msg=name)


# ---- Llama 3.1-style rope scaling, stored by llama.cpp as a rope_freqs tensor ----

def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    freq_factors = llama3_freq_factors(16, 500000.0, 32.0, 1.0, 4.0, 8192)
    assert 1.0 < freq_factors[4] < 32.0  # the file covers all three bands, smoothed middle included
    ckpt = GGUFCheckpoint(_write_minimal_gguf(tmp_path / "llama3.gguf", rope_freqs=freq_factors))
    config = ckpt.hf_config
    assert config.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    # transformers' own llama3 rotary frequencies are the plain ones divided by the file's factors
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(inv_freq.double(), plain / torch.from_numpy(freq_factors), rtol=1e-5, atol=0)
    assert all(not name.startswith("rope_freqs") for name, _ in ckpt.weights())


def test_unknown_rope_freqs_are_refused(tmp_path):
    factors = np.linspace(1.0, 7.0, 8)
    with pytest.raises(ValueError, match="rope_freqs"):
        GGUFCheckpoint(_write_minimal_gguf(tmp_path / "odd-rope.gguf", rope_freqs=factors))


# ---- bad input: one line naming the problem ----

def _write_minimal_gguf(path, architecture: str = "llama", qtype: GGMLQuantizationType = F32,
                        rope_freqs: np.ndarray | None = None) -> str:
    """One embedding tensor, hidden 32, 2 heads of 16; enough metadata to open."""
    writer = _minimal_writer(path, architecture)
    writer.add_rope_freq_base(500000.0)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    if qtype == F32:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:  # raw blocks of the right byte size; their values do not matter, loading must stop first
        block_elems, block_bytes = gguf_quant_size(qtype)
        writer.add_tensor("token_embd.weight", np.zeros((4, 32 // block_elems * block_bytes), dtype=np.uint8),
                          raw_dtype=qtype)
    return finish_gguf(writer)


def _minimal_writer(path, architecture: str = "llama") -> GGUFWriter:
    writer = GGUFWriter(os.fspath(path), architecture)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    return writer


def gguf_quant_size(qtype: GGMLQuantizationType) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[qtype]


def _one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_minimal_file_opens(tmp_path):
    assert GGUFCheckpoint(_write_minimal_gguf(tmp_path / "ok.gguf")).hf_config.hidden_size == 32


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as exc_info:
        GGUFCheckpoint(tmp_path / "nope.gguf")
    assert "nope.gguf" in _one_line_error(exc_info)


def test_non_gguf_file_is_rejected(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("{\"not\": \"a gguf\"}")
    with pytest.raises(ValueError) as exc_info:
        GGUFCheckpoint(path)
    assert "not a GGUF file" in _one_line_error(exc_info)


def test_truncated_gguf_is_rejected(tmp_path):
    full = _write_minimal_gguf(tmp_path / "full.gguf")
    path = tmp_path / "truncated.gguf"
    path.write_bytes(open(full, "rb").read()[:40])
    with pytest.raises(ValueError) as exc_info:
        GGUFCheckpoint(path)
    assert "truncated.gguf" in _one_line_error(exc_info)


def test_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(ValueError) as exc_info:
        GGUFCheckpoint(_write_minimal_gguf(tmp_path / "gpt2.gguf", architecture="gpt2"))
    message = _one_line_error(exc_info)
    assert "unsupported GGUF architecture 'gpt2'" in message and "llama" in message


def test_unsupported_quantization_type_is_named_at_open(tmp_path):
    with pytest.raises(ValueError) as exc_info:
        GGUFCheckpoint(_write_minimal_gguf(tmp_path / "iq4.gguf", qtype=GGMLQuantizationType.IQ4_NL))
    message = _one_line_error(exc_info)
    assert "token_embd.weight" in message and "IQ4_NL" in message


def test_unknown_tensor_name_is_named():
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
        gguf_to_hf_name("blk.0.attn_qkv.weight")


def test_sentencepiece_vocabulary_tokenizer(tmp_path):
    """llama-2 style: '▁' word starts, <0xNN> byte fallback, scores instead of merges, BOS added."""
    tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
              + ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "▁hell", "▁w", "or"])
    writer = _minimal_writer(tmp_path / "spm.gguf")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
                           + [TokenType.NORMAL] * 15)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(15)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), dtype=np.float32))
    tokenizer = GGUFCheckpoint(finish_gguf(writer)).tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("hello world")) == \
        ["<s>", "▁hell", "o", "▁w", "or", "l", "d"]
    ids = tokenizer.encode("héllo\n", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids)[1:3] == ["<0xC3>", "<0xA9>"]  # é, byte fallback
    assert tokenizer.decode(ids) == "héllo\n"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")


def test_a_file_is_parsed_once_until_it_changes_and_each_engine_gets_its_own_config(tmp_path):
    from sluice.models.model_config import read_checkpoint

    path = _write_minimal_gguf(tmp_path / "m.gguf")
    first = open_gguf(path)
    assert open_gguf(path) is first  # the config, then the weights: one parse
    _, config_a, is_gguf = read_checkpoint(path, "auto")
    _, config_b, _ = read_checkpoint(path, "auto")
    assert is_gguf and config_a is not config_b and config_a is not first.hf_config
    config_a.sluice_max_model_len = 7  # what one engine sets on its config stays its own
    assert not hasattr(config_b, "sluice_max_model_len") and not hasattr(first.hf_config, "sluice_max_model_len")
    _write_minimal_gguf(tmp_path / "m.gguf", rope_freqs=llama3_freq_factors(16, 500000.0, 32.0, 1.0, 4.0, 8192))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000_000))
    changed = open_gguf(path)
    assert changed is not first and changed.hf_config.rope_parameters["rope_type"] == "llama3"
