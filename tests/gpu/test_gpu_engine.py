"""The engine on CUDA gives the CPU reference's greedy tokens: float32 token for token, with and
without CUDA graphs (decode and mixed-step), under chunked prefill and prefix caching (tiny random model); bfloat16
agrees on the first 32 tokens for most prompts (tiny trained model: a random one's near-tied logits
would make bfloat16 rounding flip coins). Every KV block is back in the pool afterwards. Skipped
without CUDA."""
from __future__ import annotations

import random

import pytest
import torch

from sluice import LLM, SamplingParams
from tests.tiny_models import copy_task_prompts, hf_greedy, save_tiny_model, save_trained_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ENGINE_ARGS = dict(max_model_len=256, block_size=16, max_num_batched_tokens=64, enable_prefix_caching=True,
                   max_num_seqs=32)
BF16_TOKENS = 32


def _prompts(vocab_size: int = 384) -> list[list[int]]:
    rng = random.Random(0)
    lengths = [1, 3, 7, 16, 17, 31, 40, 64, 5, 23, 90, 2, 11]  # 13 requests: decode buckets pad to 16
    prompts = [[rng.randrange(4, vocab_size) for _ in range(n)] for n in lengths]
    shared = [rng.randrange(4, vocab_size) for _ in range(48)]
    return prompts + [shared + [rng.randrange(4, vocab_size) for _ in range(k)] for k in (1, 9, 16)]


def _params(prompts: list[list[int]], max_tokens: int) -> list[SamplingParams]:
    # Different lengths: requests finish at different steps, so decode batches shrink across buckets.
    return [SamplingParams(temperature=0.0, max_tokens=max_tokens - (i % 5), ignore_eos=True)
            for i in range(len(prompts))]


def _generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _assert_no_leaked_blocks(llm: LLM) -> None:
    pool = llm.llm_engine.core.scheduler.kv_cache_manager.block_pool
    assert not llm.llm_engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks
    assert all(block.ref_cnt == 0 for block in pool.blocks)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))


def _cpu_reference(model_path: str, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    llm = LLM(model=model_path, dtype="float32", device="cpu", **ENGINE_ARGS)
    return prompts, _generate(llm, prompts, _params(prompts, 40))


@pytest.fixture(scope="module")
def cpu_reference(model_path):
    return _cpu_reference(model_path, _prompts())


@pytest.fixture(scope="module")
def trained_model_path(tmp_path_factory):
    return str(save_trained_tiny_model(tmp_path_factory.mktemp("trained_llama")))


@pytest.fixture(scope="module")
def trained_cpu_reference(trained_model_path):
    """Copy-task prompts (as in training): the trained model continues them with wide margins."""
    return _cpu_reference(trained_model_path, copy_task_prompts())


def _cuda_llm(model_path: str, dtype: str, cuda_graphs: bool, **overrides) -> LLM:
    llm = LLM(model=model_path, dtype=dtype, device="cuda", enforce_eager=not cuda_graphs,
              **{**ENGINE_ARGS, **overrides})
    runner = llm.llm_engine.core.runner
    assert (runner.decode_graphs is not None) == cuda_graphs
    assert (runner.mixed_graphs is not None) == cuda_graphs
    return llm


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["cuda_graphs", "eager"])
def test_float32_greedy_equals_cpu_reference(model_path, cpu_reference, cuda_graphs):
    prompts, expected = cpu_reference
    llm = _cuda_llm(model_path, "float32", cuda_graphs)
    params = _params(prompts, 40)
    for round_ in range(2):  # the second round hits the prefix cache for every prompt
        got = _generate(llm, prompts, params)
        for i, (want, have) in enumerate(zip(expected, got)):
            assert have == want, f"round {round_}: prompt {i} ({len(prompts[i])} tokens) diverged"
        _assert_no_leaked_blocks(llm)
    assert llm.llm_engine.core.make_stats().prefix_cache_hits > 0
    runner = llm.llm_engine.core.runner
    if cuda_graphs:
        for graphs in (runner.decode_graphs, runner.mixed_graphs):  # budget 64: chunks run as mixed graphs
            assert graphs.num_graphs == len(graphs.sizes) and graphs.num_replays > 0


def test_float32_greedy_equals_cpu_reference_with_whole_prompts_in_mixed_graphs(model_path, cpu_reference):
    """A 256-token budget: prompts up to 90 tokens run unchunked, in mixed graphs of up to 256 tokens
    whose attention takes the large row tile (chunks over 64 tokens)."""
    prompts, expected = cpu_reference
    llm = _cuda_llm(model_path, "float32", cuda_graphs=True, max_num_batched_tokens=256)
    assert llm.llm_engine.core.runner.mixed_graphs.sizes[-1] == 256
    got = _generate(llm, prompts, _params(prompts, 40))
    for i, (want, have) in enumerate(zip(expected, got)):
        assert have == want, f"prompt {i} ({len(prompts[i])} tokens) diverged"
    _assert_no_leaked_blocks(llm)
    assert llm.llm_engine.core.runner.mixed_graphs.num_replays > 0


def test_float32_greedy_equals_cpu_reference_with_split_kv_in_long_context_mixed_graphs(
        model_path, cpu_reference):
    """Mixed steps split KV once a context reaches the backend's mixed_split_min_seq_len (8192 in service;
    64 here, so that the tiny model reaches it): they replay the second set of mixed graphs."""
    prompts, expected = cpu_reference
    llm = _cuda_llm(model_path, "float32", cuda_graphs=False)
    runner = llm.llm_engine.core.runner
    runner.attn_backend.mixed_split_min_seq_len = 64  # before the graphs are captured: they read it
    runner.capture_cuda_graphs()
    assert runner.mixed_graphs.max_seq_len == 63 and runner.long_context_mixed_graphs.max_seq_len == 256
    got = _generate(llm, prompts, _params(prompts, 40))
    for i, (want, have) in enumerate(zip(expected, got)):
        assert have == want, f"prompt {i} ({len(prompts[i])} tokens) diverged"
    _assert_no_leaked_blocks(llm)
    assert runner.long_context_mixed_graphs.num_replays > 0


def test_float32_penalties_and_min_tokens_with_async_scheduling_equal_cpu_reference(model_path):
    """Penalties and min_tokens count the sample still in flight on the GPU: no step waits for the
    previous one, and the tokens equal the CPU's (synchronous) ones."""
    prompts = _prompts()
    params = [SamplingParams(temperature=0.0, max_tokens=30, frequency_penalty=0.7, presence_penalty=0.4,
                             repetition_penalty=1.3, min_tokens=10, stop_token_ids=[p[0]], ignore_eos=True)
              for p in prompts]
    cpu = LLM(model=model_path, dtype="float32", device="cpu", **ENGINE_ARGS)
    expected = _generate(cpu, prompts, params)
    llm = _cuda_llm(model_path, "float32", cuda_graphs=True)
    runner = llm.llm_engine.core.runner
    must_collect_first = runner.must_collect_first
    collected_first = []
    runner.must_collect_first = lambda out: collected_first.append(must_collect_first(out)) or collected_first[-1]
    try:
        got = _generate(llm, prompts, params)
    finally:
        del runner.must_collect_first  # the wrapper holds the runner: free its GPU memory with the LLM
    assert got == expected
    assert collected_first and not any(collected_first)
    _assert_no_leaked_blocks(llm)


def test_bfloat16_first_tokens_agree_with_float32_cpu(trained_model_path, trained_cpu_reference):
    prompts, expected = trained_cpu_reference
    oracle = hf_greedy(trained_model_path, prompts, 40)
    assert all(want == hf[:len(want)] for want, hf in zip(expected, oracle)), "CPU reference != transformers"
    llm = _cuda_llm(trained_model_path, "bfloat16", cuda_graphs=True)
    got = _generate(llm, prompts, _params(prompts, 40))
    agree = sum(have[:BF16_TOKENS] == want[:BF16_TOKENS] for have, want in zip(got, expected))
    assert agree >= 0.75 * len(prompts), f"only {agree} of {len(prompts)} prompts agree on {BF16_TOKENS} tokens"
    _assert_no_leaked_blocks(llm)


def _sluice_triton_kernels() -> list:
    from triton.runtime.jit import JITFunction

    from sluice.attention import triton_kernels
    from sluice.layers import fused_kernels
    from sluice.sample import fused_sampling
    return [fn for module in (triton_kernels, fused_kernels, fused_sampling) for fn in vars(module).values()
            if isinstance(fn, JITFunction)]


def test_steps_compile_no_kernel_after_startup(model_path):
    """Start-up builds every Triton kernel variant that steps use: request and token counts of 1 or
    multiples of 16, long prompts, greedy, random, seeded and mixed batches run without a compile
    (each one stops the whole batch for about a second on the H100)."""
    from sluice.bench.compile_log import CompileLog

    for kernel in _sluice_triton_kernels():  # forget what earlier tests compiled in this process
        kernel.device_caches.clear()
    # 2048 tokens a step: the larger steps run eagerly (mixed graphs go up to 1024 tokens)
    llm = _cuda_llm(model_path, "bfloat16", cuda_graphs=True, max_num_batched_tokens=2048)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    random_ = SamplingParams(temperature=0.8, max_tokens=9, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    batches = [(1, [greedy]), (16, [random_]), (3, [seeded]), (17, [greedy, random_, seeded]),
               (32, [random_, seeded]), (5, [greedy, random_])]
    rng = random.Random(1)
    with CompileLog() as compiles:
        for count, kinds in batches:
            prompts = [[rng.randrange(4, 384) for _ in range(rng.choice([1, 16, 33, 64, 150]))]
                       for _ in range(count)]
            params = [kinds[i % len(kinds)] for i in range(count)]
            outputs = _generate(llm, prompts, params)
            assert [len(tokens) for tokens in outputs] == [p.max_tokens for p in params]
    assert [event["kernel"] for event in compiles.events] == []
    _assert_no_leaked_blocks(llm)
