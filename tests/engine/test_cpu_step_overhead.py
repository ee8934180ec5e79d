"""Per-step work the CPU path avoids: malloc thresholds, cos/sin once per step, cheap params clones."""
import torch

from sluice.layers.rope_scaling import RopeSettings
from sluice.layers.rotary import RotaryEmbedding
from sluice.sampling_params import SamplingParams, StructuredOutputsParams
from sluice.worker import cpu_malloc


def test_malloc_thresholds_are_set_once_and_can_be_left_alone(monkeypatch):
    monkeypatch.setattr(cpu_malloc, "_tuned", False)
    monkeypatch.setenv(cpu_malloc.ENV_MALLOC_TUNING, "0")
    assert cpu_malloc.tune_cpu_malloc() is False
    monkeypatch.delenv(cpu_malloc.ENV_MALLOC_TUNING)
    assert cpu_malloc.tune_cpu_malloc() is True  # glibc (the Linux machines tests run on)
    assert cpu_malloc.tune_cpu_malloc() is True


def _rope(head_dim=16, theta=10000.0):
    return RotaryEmbedding(head_dim, RopeSettings(rope_theta=theta))


def test_layers_of_one_step_share_cos_sin_and_get_the_same_rotation():
    torch.manual_seed(0)
    first, second, other = _rope(), _rope(), _rope(theta=500.0)
    positions = torch.tensor([0, 5, 9, 130])
    q, k = torch.randn(4, 2 * 16), torch.randn(4, 16)
    RotaryEmbedding._step_cos_sin = None
    expected = second.forward_torch(positions.clone(), q, k)  # its own positions tensor: computed afresh
    out1 = first.forward_torch(positions, q, k)
    cached = RotaryEmbedding._step_cos_sin
    out2 = second.forward_torch(positions, q, k)
    assert RotaryEmbedding._step_cos_sin is cached  # reused, not recomputed
    for a, b, c in zip(out1, out2, expected):
        assert torch.equal(a, b) and torch.equal(b, c)
    # other frequencies, another dtype or another positions tensor: computed again
    out3 = other.forward_torch(positions, q, k)
    assert RotaryEmbedding._step_cos_sin is not cached
    assert not torch.equal(out3[0], out1[0])
    out4 = first.forward_torch(positions, q.double(), k.double())
    assert out4[0].dtype == torch.float64 and torch.allclose(out4[0].float(), out1[0], atol=1e-6)
    moved = torch.tensor([1, 6, 10, 131])
    assert not torch.equal(first.forward_torch(moved, q, k)[0], out1[0])


def test_clone_copies_containers_and_nested_params():
    params = SamplingParams(stop=["a"], stop_token_ids=[7], logit_bias={3: 1.0}, allowed_token_ids=[1, 2],
                            structured_outputs=StructuredOutputsParams(json={"type": "object"}), seed=4)
    copy = params.clone()
    assert copy == params
    copy.stop.append("b")
    copy.stop_token_ids.append(8)
    copy.logit_bias[5] = 2.0
    copy.allowed_token_ids.append(3)
    copy.structured_outputs.json["type"] = "array"
    copy.all_stop_token_ids.add(99)
    assert params.stop == ["a"] and params.stop_token_ids == [7] and params.logit_bias == {3: 1.0}
    assert params.allowed_token_ids == [1, 2] and params.structured_outputs.json == {"type": "object"}
    assert 99 not in params.all_stop_token_ids


def test_positions_updated_in_place_get_new_cos_sin():
    """A proposer that advances its positions tensor in place between forwards must not see stale cos/sin."""
    rope = _rope()
    positions = torch.tensor([3, 4, 5])
    q, k = torch.randn(3, 16), torch.randn(3, 16)
    RotaryEmbedding._step_cos_sin = None
    rope.forward_torch(positions, q, k)
    positions.add_(1)
    moved = rope.forward_torch(positions, q, k)
    fresh = rope.forward_torch(positions.clone(), q, k)
    assert torch.equal(moved[0], fresh[0]) and torch.equal(moved[1], fresh[1])


def test_positions_made_under_inference_mode_are_rotated_fresh_each_time():
    """Inference tensors keep no version counter: they are never cached, so in-place updates stay safe."""
    rope = _rope()
    q, k = torch.randn(3, 16), torch.randn(3, 16)
    RotaryEmbedding._step_cos_sin = None
    with torch.inference_mode():
        positions = torch.tensor([3, 4, 5])
        rope.forward_torch(positions, q, k)
        assert RotaryEmbedding._step_cos_sin is None
        positions.add_(1)
        moved = rope.forward_torch(positions, q, k)
    fresh = rope.forward_torch(torch.tensor([4, 5, 6]), q, k)
    assert torch.equal(moved[0], fresh[0]) and torch.equal(moved[1], fresh[1])
