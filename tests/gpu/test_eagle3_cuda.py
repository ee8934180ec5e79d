"""EAGLE-3 on CUDA: the aux hidden states a captured graph writes equal transformers' layer inputs, greedy output
with the head equals transformers, and the proposals under CUDA graphs equal the eager engine's (float32, a tiny
random target and head)."""
from __future__ import annotations

import pytest
import torch

from sluice import LLM, SamplingParams
from tests.spec_decode.test_eagle3 import AUX_LAYER_IDS, TARGET_LAYERS, save_eagle3_head
from tests.spec_decode.test_spec_engine import _prompts
from tests.tiny_models import hf_greedy, save_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_eagle3_under_cuda_graphs_matches_eager_and_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    target = save_tiny_model(tmp_path / "target", "llama", num_hidden_layers=TARGET_LAYERS)
    head = save_eagle3_head(tmp_path / "head")
    prompts = _prompts()
    expected = hf_greedy(target, prompts, 16)
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to("cuda").eval()
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    proposals = {}
    for eager in (True, False):
        llm = LLM(model=str(target), dtype="float32", device="cuda", max_model_len=128, enforce_eager=eager,
                  speculative_config={"method": "eagle3", "model": str(head), "num_speculative_tokens": 3},
                  num_kv_blocks=256, max_num_seqs=16, skip_tokenizer_init=True)
        runner = llm.llm_engine.core.runner
        calls, propose = [], runner.proposer.propose
        runner.proposer.propose = lambda *a, **k: calls.append(propose(*a, **k)) or calls[-1]
        prompt = prompts[3]
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
                     use_tqdm=False)
        with torch.no_grad():
            states = hf(torch.tensor([prompt], device="cuda"), output_hidden_states=True).hidden_states
        want = torch.cat([states[i][0] for i in AUX_LAYER_IDS], -1)
        torch.testing.assert_close(runner.proposer._aux.buffer[:len(prompt)], want, rtol=1e-4, atol=1e-4)
        calls.clear()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        if not eager:
            assert runner.decode_graphs is not None and runner.decode_graphs.num_replays > 0
        proposals[eager] = [t for c in calls for v in c.values() for t in v]
        del llm
        torch.cuda.empty_cache()
    assert proposals[True] and proposals[True] == proposals[False]
