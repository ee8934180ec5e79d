"""adapter_config.json checks: what sluice applies is read (rank, alpha / r or rsLoRA's alpha / sqrt(r)); what it
cannot apply is a ValueError naming it."""
from __future__ import annotations

import json
import math

import pytest

from sluice.lora.peft_config import read_peft_config


def _write(path, **config):
    path.mkdir(exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                          "target_modules": ["q_proj"], **config}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return str(path)


def test_scaling_is_alpha_over_rank_or_over_its_root_with_rslora(tmp_path):
    assert read_peft_config(_write(tmp_path / "plain"), 16).scaling == 2.0
    assert read_peft_config(_write(tmp_path / "rs", use_rslora=True), 16).scaling == pytest.approx(16 / math.sqrt(8))


@pytest.mark.parametrize("config, named", [
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
    ({"target_modules": ["embed_tokens"]}, "embed_tokens"),
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"peft_type": "IA3"}, "IA3"),
    ({"r": 32}, "max_lora_rank=16"),
])
def test_what_sluice_cannot_apply_is_named(tmp_path, config, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        read_peft_config(_write(tmp_path / "adapter", **config), 16)
