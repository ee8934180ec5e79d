"""PoolerConfig from sentence-transformers files (both formats), the refusals, and the runner choice."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sluice.pooling.config import PoolerConfig, load_pooler_config, prefix_caching_applies, resolve_runner
from sluice.pooling.params import PoolingParams

HF = SimpleNamespace(hidden_size=32, architectures=["Qwen3ForCausalLM"])


def _write(folder, modules: list[tuple[str, str]], pooling: dict | None = None):
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)]))
    if pooling is not None:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return str(folder)


def test_legacy_files_qwen3_embedding_style(tmp_path):
    path = _write(tmp_path, [("", "sentence_transformers.models.Transformer"),
                             ("1_Pooling", "sentence_transformers.models.Pooling"),
                             ("2_Normalize", "sentence_transformers.models.Normalize")],
                  {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
                   "pooling_mode_max_tokens": False, "pooling_mode_lasttoken": True, "include_prompt": True})
    assert load_pooler_config(path, HF) == PoolerConfig("LAST", normalize=True, hidden_size=32)


def test_v6_files_mean_without_normalize(tmp_path):
    path = _write(tmp_path, [("", "sentence_transformers.base.modules.transformer.Transformer"),
                             ("1_Pooling", "sentence_transformers.sentence_transformer.modules.pooling.Pooling")],
                  {"embedding_dimension": 32, "pooling_mode": "mean", "include_prompt": True})
    config = load_pooler_config(path, HF)
    assert config.pooling_type == "MEAN" and not config.normalize
    assert config.needs_every_position and not prefix_caching_applies(config)


def test_no_files_means_last_token_normalized_and_matryoshka_from_config(tmp_path):
    hf = SimpleNamespace(hidden_size=32, matryoshka_dimensions=[8, 16])
    config = load_pooler_config(str(tmp_path), hf)
    assert config == PoolerConfig("LAST", True, 32, is_matryoshka=True, matryoshka_dimensions=(8, 16))
    assert prefix_caching_applies(config) and prefix_caching_applies(None)


@pytest.mark.parametrize("modules, pooling, match", [
    ([("", "x.Transformer"), ("1_Pooling", "x.Pooling"), ("2_Dense", "x.Dense")], {"pooling_mode": "mean"}, "Dense"),
    ([("1_Pooling", "x.Pooling")], {"pooling_mode": "max"}, "pooling mode"),
    ([("1_Pooling", "x.Pooling")], {"pooling_mode": ["mean", "cls"]}, "exactly one"),
    ([("1_Pooling", "x.Pooling")], {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, "exactly one"),
    ([("1_Pooling", "x.Pooling")], {"pooling_mode": "mean", "embedding_dimension": 64}, "hidden_size is 32"),
])
def test_unsupported_heads_are_refused(tmp_path, modules, pooling, match):
    with pytest.raises(ValueError, match=match):
        load_pooler_config(_write(tmp_path, modules, pooling), HF)


def test_runner_resolution(tmp_path):
    plain = str(tmp_path)
    assert resolve_runner("auto", "auto", plain, HF) == "generate"
    assert resolve_runner("pooling", "auto", plain, HF) == "pooling"
    assert resolve_runner("auto", "embed", plain, HF) == "pooling"
    assert resolve_runner("auto", "auto", plain, SimpleNamespace(architectures=["Qwen3Model"])) == "pooling"
    with pytest.raises(ValueError, match="contradicts"):
        resolve_runner("generate", "embed", plain, HF)
    _write(tmp_path, [("", "x.Transformer")])
    assert resolve_runner("auto", "auto", plain, HF) == "pooling"  # a sentence-transformers folder
    assert resolve_runner("generate", "auto", plain, HF) == "generate"


def test_pooling_params_dimensions():
    matryoshka = PoolerConfig(hidden_size=32, is_matryoshka=True)
    PoolingParams(dimensions=32).verify(matryoshka, "m")
    for bad, match in ((0, "between 1 and 32"), (33, "between 1 and 32")):
        with pytest.raises(ValueError, match=match):
            PoolingParams(dimensions=bad).verify(matryoshka, "m")
    with pytest.raises(ValueError, match="does not support Matryoshka"):
        PoolingParams(dimensions=8).verify(PoolerConfig(hidden_size=32), "m")
    with pytest.raises(ValueError, match=r"supports only \[8, 16\]"):
        PoolingParams(dimensions=12).verify(PoolerConfig(hidden_size=32, is_matryoshka=True,
                                                         matryoshka_dimensions=(8, 16)), "m")
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        PoolingParams(truncate_prompt_tokens=0).verify(matryoshka, "m")
