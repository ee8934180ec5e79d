"""Tiny embedding checkpoints in sentence-transformers layout, and their reference embeddings.

Two layouts, both written by hand so that no test depends on a sentence-transformers release:
    v6 (``legacy=False``): a bare ``*Model`` checkpoint (names without ``model.``, no LM head), v6 module
                          type names and ``{"pooling_mode": "lasttoken"}``, as sentence-transformers 6 saves
    legacy:               a ``*ForCausalLM`` checkpoint (Qwen3-Embedding style) with the classic
                          ``sentence_transformers.models.*`` names and ``pooling_mode_*`` booleans
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_models import build_tokenizer, save_tiny_model

_ST_MODES = {"LAST": "lasttoken", "MEAN": "mean", "CLS": "cls"}
_LEGACY_KEYS = {"LAST": "pooling_mode_lasttoken", "MEAN": "pooling_mode_mean_tokens", "CLS": "pooling_mode_cls_token"}


def save_embedding_model(path: str | Path, arch: str, pooling: str, normalize: bool = True, legacy: bool = False,
                         seed: int = 0, **overrides) -> Path:
    path = Path(path)
    if legacy:
        save_tiny_model(path, arch, seed=seed, **overrides)
    else:  # the same weights as the causal LM, saved as the bare decoder
        from transformers import AutoModel
        causal = save_tiny_model(path.with_name(path.name + "-causal"), arch, seed=seed, **overrides)
        AutoModel.from_pretrained(causal, dtype=torch.float32).save_pretrained(path)
        build_tokenizer().save_pretrained(path)
    hidden_size = json.loads((path / "config.json").read_text())["hidden_size"]
    prefix = "sentence_transformers.models." if legacy else "sentence_transformers.base.modules."
    modules = [{"idx": 0, "name": "0", "path": "", "type": prefix + ("Transformer" if legacy else "transformer.Transformer")},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": prefix + "Pooling" if legacy else "sentence_transformers.sentence_transformer.modules.pooling.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": prefix + ("Normalize" if legacy else "normalize.Normalize")})
        (path / "2_Normalize").mkdir()
        (path / "2_Normalize" / "config.json").write_text("{}")
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    if legacy:
        pooling_config = {"word_embedding_dimension": hidden_size, "include_prompt": True,
                          **{key: key == _LEGACY_KEYS[pooling] for key in _LEGACY_KEYS.values()},
                          "pooling_mode_max_tokens": False}
    else:
        pooling_config = {"embedding_dimension": hidden_size, "pooling_mode": _ST_MODES[pooling], "include_prompt": True}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    return path


@torch.no_grad()
def hf_embeddings(path: str | Path, prompts: list[list[int]], pooling: str, normalize: bool) -> list[torch.Tensor]:
    """transformers' final hidden states, pooled and normalized by hand, one unpadded prompt at a time."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        hidden = model(torch.tensor([prompt])).last_hidden_state[0]
        vector = {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[pooling]
        out.append(torch.nn.functional.normalize(vector, dim=-1) if normalize else vector)
    return out


def st_embeddings(path: str | Path, texts: list[str]) -> list[torch.Tensor]:
    """sentence-transformers' own encode of the folder, one text at a time (no padding)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    return [torch.from_numpy(model.encode([t], batch_size=1, convert_to_numpy=True)[0]) for t in texts]
