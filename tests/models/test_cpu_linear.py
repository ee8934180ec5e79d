"""Packed bf16/fp16 weights on the CPU (layers/cpu_linear.py): the same numbers as F.linear, bit for bit; with
float32 copies, products of many rows equal the float32 product of the same values rounded once."""
import pytest
import torch
import torch.nn.functional as F

from sluice.layers import cpu_linear
from sluice.layers.cpu_linear import (CpuPackedLinearMethod, PackedWeight, float32_copy_rows, pack_cpu_weights,
                                      packed_linear_supported)
from sluice.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from sluice.layers.quantization.base import UnquantizedLinearMethod

needs_bf16 = pytest.mark.skipif(not packed_linear_supported(torch.bfloat16),
                                reason="this CPU has no native bf16 matmul (or oneDNN is missing)")


@needs_bf16
@pytest.mark.parametrize("rows", [1, 3, 16, 257])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_product_equals_f_linear_bit_for_bit(rows, bias):
    torch.manual_seed(rows)
    weight = torch.randn(384, 160, dtype=torch.bfloat16)
    b = torch.randn(384, dtype=torch.bfloat16) if bias else None
    packed = PackedWeight(weight)
    for shape in ((rows, 160), (2, rows, 160)):
        x = torch.randn(shape, dtype=torch.bfloat16)
        assert torch.equal(packed.linear(x, b), F.linear(x, weight, b))


@needs_bf16
def test_weight_changed_in_place_is_packed_again():
    weight = torch.randn(64, 32, dtype=torch.bfloat16)
    packed = PackedWeight(weight)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    before = packed.linear(x, None)
    with torch.no_grad():
        weight.mul_(2)
    after = packed.linear(x, None)
    assert torch.equal(after, F.linear(x, weight)) and not torch.equal(after, before)


@needs_bf16
def test_other_input_dtypes_and_empty_inputs_take_f_linear():
    weight = torch.randn(64, 32, dtype=torch.bfloat16)
    packed = PackedWeight(weight)
    assert packed.linear(torch.empty(0, 32, dtype=torch.bfloat16), None).shape == (0, 64)
    with pytest.raises(RuntimeError):  # F.linear's own dtype error, not a silent cast
        packed.linear(torch.randn(2, 32), None)


@needs_bf16
@pytest.mark.parametrize("bias", [False, True])
def test_float32_copy_takes_products_from_the_row_threshold(bias):
    torch.manual_seed(0)
    weight = torch.randn(384, 160, dtype=torch.bfloat16)
    b = torch.randn(384, dtype=torch.bfloat16) if bias else None
    packed = PackedWeight(weight, f32_min_rows=16)
    assert packed.packed_f32 is not None
    for rows in (1, 15):  # below: the bf16 product, bit for bit
        x = torch.randn(rows, 160, dtype=torch.bfloat16)
        assert torch.equal(packed.linear(x, b), F.linear(x, weight, b))
    for shape in ((16, 160), (2, 40, 160)):  # from 16 rows (3-D inputs count every row): float32, rounded once
        x = torch.randn(shape, dtype=torch.bfloat16)
        out = packed.linear(x, b)
        exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
        assert out.dtype == torch.bfloat16 and out.shape == exact.shape
        torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-3)  # within half a bf16 ulp
    # Which copy each product reads (the closeness above would hold for the bf16 product too): with the bf16 copy
    # swapped for a packed zero weight, 15 rows give the bias alone and 16 rows are unchanged.
    large, small = torch.randn(16, 160, dtype=torch.bfloat16), torch.randn(15, 160, dtype=torch.bfloat16)
    before = packed.linear(large, b)
    bf16_packed = packed.packed
    packed.packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(weight), 256)
    assert torch.equal(packed.linear(large, b), before)
    assert torch.equal(packed.linear(small, b), torch.zeros(15, 384, dtype=torch.bfloat16) + (0 if b is None else b))
    packed.packed = bf16_packed
    with torch.no_grad():
        weight.mul_(2)  # changed in place: both copies are packed again
    x = torch.randn(32, 160, dtype=torch.bfloat16)
    torch.testing.assert_close(packed.linear(x, b).double(),
                               F.linear(x.double(), weight.double(), None if b is None else b.double()),
                               rtol=2 ** -8, atol=1e-3)


def test_float32_copies_are_chosen_by_the_switch_the_timing_and_the_memory(monkeypatch):
    monkeypatch.setenv(cpu_linear.ENV_F32_PRODUCTS, "0")
    assert float32_copy_rows(torch.bfloat16, 1 << 20) is None
    monkeypatch.setenv(cpu_linear.ENV_F32_PRODUCTS, "1")
    assert float32_copy_rows(torch.bfloat16, 1 << 40) == cpu_linear.DEFAULT_F32_MIN_ROWS
    monkeypatch.setenv(cpu_linear.ENV_F32_MIN_ROWS, "64")
    assert float32_copy_rows(torch.bfloat16, 1 << 20) == 64
    monkeypatch.delenv(cpu_linear.ENV_F32_MIN_ROWS)
    monkeypatch.setenv(cpu_linear.ENV_F32_PRODUCTS, "auto")
    monkeypatch.setattr(cpu_linear, "float32_products_speedup", lambda dtype: 1.5)
    assert float32_copy_rows(torch.bfloat16, 1 << 20) == cpu_linear.DEFAULT_F32_MIN_ROWS
    assert float32_copy_rows(torch.bfloat16, cpu_linear.F32_MAX_EXTRA_BYTES + 1) is None  # too much memory
    monkeypatch.setattr(cpu_linear, "float32_products_speedup", lambda dtype: 1.05)  # e.g. AMX: bf16 is as fast
    assert float32_copy_rows(torch.bfloat16, 1 << 20) is None
    monkeypatch.setenv(cpu_linear.ENV_F32_PRODUCTS, "yes")
    with pytest.raises(ValueError, match=cpu_linear.ENV_F32_PRODUCTS):
        float32_copy_rows(torch.bfloat16, 1 << 20)


def _layers(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = torch.nn.ModuleDict({"gate_up": MergedColumnParallelLinear(32, [48, 48]),
                                     "down": RowParallelLinear(48, 32)})
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    return model


@needs_bf16
@pytest.mark.parametrize("f32", ["0", "1"])
def test_pack_cpu_weights_moves_dense_layers_to_the_packed_method(monkeypatch, f32):
    monkeypatch.setenv(cpu_linear.ENV_F32_PRODUCTS, f32)
    model = _layers(torch.bfloat16)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    expected = model["down"](model["gate_up"](x)[:, :48])
    assert pack_cpu_weights(model) == 2
    assert all(isinstance(m.linear_method, CpuPackedLinearMethod) for m in model.values())
    assert all((m.packed_weight.packed_f32 is not None) == (f32 == "1") for m in model.values())
    assert torch.equal(model["down"](model["gate_up"](x)[:, :48]), expected)  # 5 rows: the bf16 products


def test_float32_models_and_the_off_switch_keep_f_linear(monkeypatch):
    model = _layers(torch.float32)
    assert pack_cpu_weights(model) == 0
    assert all(type(m.linear_method) is UnquantizedLinearMethod for m in model.values())
    monkeypatch.setenv("SLUICE_CPU_PACKED_LINEAR", "0")
    assert not packed_linear_supported(torch.bfloat16)
    assert pack_cpu_weights(_layers(torch.bfloat16)) == 0


@needs_bf16
def test_engine_greedy_output_is_the_same_with_and_without_packing(monkeypatch, tmp_path):
    """bf16 tiny Llama through the whole engine: packing changes no token."""
    from sluice import LLM, SamplingParams
    from tests.tiny_models import save_tiny_model
    save_tiny_model(tmp_path)
    prompts = [{"prompt_token_ids": list(range(5 + i, 40 + 3 * i))} for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = []
    monkeypatch.setenv(cpu_linear.ENV_F32_PRODUCTS, "0")  # bit-exact packing only
    for flag in ("1", "0"):
        monkeypatch.setenv("SLUICE_CPU_PACKED_LINEAR", flag)
        llm = LLM(model=str(tmp_path), dtype="bfloat16", device="cpu", max_model_len=128, seed=0)
        outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        del llm
    assert outputs[0] == outputs[1] and len(outputs[0][0]) == 12


@needs_bf16
def test_a_cpu_bf16_model_is_built_with_packed_weights():
    from sluice.attention.torch_ref import TorchRefBackend
    from sluice.models.loader import build_model
    from tests.tiny_models import tiny_config
    model = build_model(tiny_config("llama"), torch.bfloat16, "cpu", TorchRefBackend(), load_format="dummy")
    methods = [type(m.linear_method) for m in model.modules() if hasattr(m, "linear_method")]
    assert methods and all(m is CpuPackedLinearMethod for m in methods)
    assert model.lm_head.packed is not None
    model32 = build_model(tiny_config("llama"), torch.float32, "cpu", TorchRefBackend(), load_format="dummy")
    assert model32.lm_head.packed is None
