"""SamplingParams validation: every bad value is a ValueError that names its field."""
import pytest

from sluice.sampling_params import SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=-3), "prompt_logprobs"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[1, -1]), "allowed_token_ids"),
    (dict(logit_bias={"x": 1.0}), "logit_bias"),
    (dict(logit_bias={-4: 1.0}), "logit_bias"),
    (dict(bad_words=[""]), "bad_words"),
])
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_penalty_bounds_are_inclusive():
    params = SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=0.01)
    assert params.uses_penalties


def test_logit_bias_keys_become_ints_and_values_are_clamped():
    params = SamplingParams(logit_bias={"5": 250, 7: -1000.0, 9: 0.5})
    assert params.logit_bias == {5: 100.0, 7: -100.0, 9: 0.5}


def test_logprobs_above_the_cap_raise_naming_the_field():
    SamplingParams(logprobs=5, prompt_logprobs=5).verify_max_logprobs(5)
    with pytest.raises(ValueError, match="logprobs=6 exceeds"):
        SamplingParams(logprobs=6).verify_max_logprobs(5)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21).verify_max_logprobs(20)


@pytest.mark.parametrize("kwargs, field", [
    (dict(logit_bias={100: 1.0}), "logit_bias"),
    (dict(allowed_token_ids=[3, 100]), "allowed_token_ids"),
])
def test_token_ids_outside_the_vocab_raise(kwargs, field):
    params = SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=f"{field} contains token id 100"):
        params.verify_against_vocab(100)
    params.verify_against_vocab(101)


class _WordTokenizer:
    """Encodes words (a leading space is its own token 1) to fixed ids; enough for bad_words."""
    vocab = {"bad": 10, "Ġbad": 11, "very": 12, "Ġvery": 13, "Ġwords": 14, "words": 15}

    def encode(self, text, add_special_tokens=False):
        ids = []
        for i, word in enumerate(text.split(" ")):
            if word:
                ids.append(self.vocab[("Ġ" if text.startswith(" ") or i > 0 else "") + word])
        return ids


def test_bad_words_are_encoded_with_and_without_a_leading_space():
    params = SamplingParams(bad_words=["bad", "very words"])
    assert params.bad_words_token_ids is None
    params.update_bad_words_from_tokenizer(_WordTokenizer())
    assert params.bad_words_token_ids == [[10], [11], [12, 14], [13, 14]]
    params.verify_against_vocab(15)
    with pytest.raises(ValueError, match="bad_words"):
        params.verify_against_vocab(14)


def test_defaults_turn_every_feature_off():
    params = SamplingParams()
    assert not params.uses_penalties
    assert params.logit_bias is None and params.allowed_token_ids is None and params.bad_words is None
    assert params.logprobs is None and params.prompt_logprobs is None
