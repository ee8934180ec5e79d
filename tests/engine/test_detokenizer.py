"""Incremental detokenization with a real byte-level BPE tokenizer: unicode, stop strings, streaming."""
import pytest

from sluice.engine.detokenizer import IncrementalDetokenizer
from sluice.sampling_params import SamplingParams
from tests.tiny_models import build_tokenizer

TEXT = "héllo 日本語 🙂 wörld, the quick brown fox"


@pytest.fixture(scope="module")
def tokenizer():
    # A small byte-level BPE: multi-byte characters stay split across several byte tokens.
    return build_tokenizer()


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def feed(detokenizer, token_ids, chunk=1):
    """Feeds tokens in chunks until a stop string hits; returns the stop string or None."""
    for start in range(0, len(token_ids), chunk):
        stop = detokenizer.update(token_ids[start:start + chunk])
        if stop is not None:
            return stop
    return None


def new_detokenizer(tokenizer, prompt="the end", **params):
    return IncrementalDetokenizer(tokenizer, encode(tokenizer, prompt), SamplingParams(**params))


def test_tokenizer_really_splits_characters_across_tokens(tokenizer):
    pieces = [tokenizer.decode([t]) for t in encode(tokenizer, TEXT)]
    assert any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("chunk", [1, 3])
def test_text_grows_to_the_full_decode_without_replacement_characters(tokenizer, chunk):
    ids = encode(tokenizer, TEXT)
    detokenizer = new_detokenizer(tokenizer)
    seen = []
    for start in range(0, len(ids), chunk):
        detokenizer.update(ids[start:start + chunk])
        assert "\ufffd" not in detokenizer.output_text
        seen.append(detokenizer.output_text)
    assert detokenizer.output_text == TEXT
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:]))


def test_special_tokens_are_skipped_unless_asked(tokenizer):
    ids = encode(tokenizer, "hello") + [tokenizer.eos_token_id]
    skipping = new_detokenizer(tokenizer)
    feed(skipping, ids)
    assert skipping.output_text == "hello"
    keeping = new_detokenizer(tokenizer, skip_special_tokens=False)
    feed(keeping, ids)
    assert keeping.output_text == "hello</s>"


def test_stop_string_split_across_tokens_ends_the_text_before_it(tokenizer):
    ids = encode(tokenizer, "héllo wörld STOP now more")
    detokenizer = new_detokenizer(tokenizer, stop=["ld ST"])
    assert feed(detokenizer, ids) == "ld ST"
    assert detokenizer.output_text == "héllo wör"


def test_include_stop_str_in_output_keeps_it(tokenizer):
    detokenizer = new_detokenizer(tokenizer, stop=["STOP"], include_stop_str_in_output=True)
    assert feed(detokenizer, encode(tokenizer, "stop here STOP now"), chunk=4) == "STOP"
    assert detokenizer.output_text == "stop here STOP"


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    detokenizer = new_detokenizer(tokenizer, stop=["fox", "quick", "日本"])
    # "quick" and "fox" both arrive in one update; "quick" comes first in the text.
    assert feed(detokenizer, encode(tokenizer, "the quick brown fox jumps"), chunk=100) == "quick"
    assert detokenizer.output_text == "the "


def test_non_ascii_stop_string(tokenizer):
    detokenizer = new_detokenizer(tokenizer, stop=["本語"])
    assert feed(detokenizer, encode(tokenizer, TEXT)) == "本語"
    assert detokenizer.output_text == "héllo 日"


def test_stop_strings_are_ignored_until_min_tokens_were_generated(tokenizer):
    ids = encode(tokenizer, "stop here stop again")
    first_stop_tokens = len(encode(tokenizer, "stop"))
    detokenizer = new_detokenizer(tokenizer, stop=["stop"], min_tokens=first_stop_tokens + 1)
    assert feed(detokenizer, ids) == "stop"
    assert detokenizer.output_text == "stop here "


def test_stop_terminated_token_text_is_left_out(tokenizer):
    ids = encode(tokenizer, "hello world")
    detokenizer = new_detokenizer(tokenizer)
    detokenizer.update(ids[:-1])
    detokenizer.update(ids[-1:], stop_terminated=True)
    assert detokenizer.output_text == tokenizer.decode(ids[:-1])
    assert detokenizer.output_token_ids == ids


def test_streaming_holds_back_text_that_could_become_a_stop_string(tokenizer):
    detokenizer = new_detokenizer(tokenizer, stop=["brown fox"])
    ids = encode(tokenizer, "the quick brown fox")
    deltas, cumulative = [], []
    for token_id in ids:
        stop = detokenizer.update([token_id])
        finished = stop is not None
        deltas.append(detokenizer.get_next_output_text(finished, delta=True))
        cumulative.append(detokenizer.get_next_output_text(finished, delta=False))
        if finished:
            break
    assert "".join(deltas) == "the quick " == cumulative[-1]
    assert all("b" not in text for text in cumulative)  # "brown" was never shown, even in part


def test_delta_streaming_without_stop_strings_concatenates_to_the_text(tokenizer):
    detokenizer = new_detokenizer(tokenizer)
    ids = encode(tokenizer, TEXT)
    deltas = []
    for token_id in ids:
        detokenizer.update([token_id])
        deltas.append(detokenizer.get_next_output_text(finished=False, delta=True))
    assert "".join(deltas) == TEXT
    assert detokenizer.get_next_output_text(finished=True, delta=True) == ""


def test_first_output_token_is_decoded_in_the_prompts_context(tokenizer):
    # The prompt ends in the first bytes of "日": the output's remaining bytes must not emit junk.
    ids = encode(tokenizer, "héllo 日本語")
    split = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    detokenizer = IncrementalDetokenizer(tokenizer, ids[:split], SamplingParams())
    feed(detokenizer, ids[split:])
    assert "\ufffd" not in detokenizer.output_text
    assert detokenizer.output_text.endswith("本語")


def test_fast_decoder_gives_the_tokenizers_own_text(tokenizer):
    """The Rust decoder used in the engine (fast_decoder) yields the same incremental text as decode()."""
    from sluice.engine.detokenizer import fast_decoder
    decoder = fast_decoder(tokenizer)
    assert decoder is not None
    special = tokenizer.eos_token_id
    ids = encode(tokenizer, TEXT) + [special] + encode(tokenizer, " and more 🙂🙂")
    for skip in (True, False):
        texts = []
        for dec in (None, decoder):
            detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "the end"),
                                           SamplingParams(skip_special_tokens=skip), dec)
            feed(detok, ids)
            texts.append(detok.output_text)
        assert texts[0] == texts[1] == tokenizer.decode(ids, skip_special_tokens=skip)


def test_fast_decoder_is_not_used_where_decode_cleans_up_spaces(tokenizer, monkeypatch):
    from sluice.engine.detokenizer import fast_decoder
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", True)
    assert fast_decoder(tokenizer) is None
    assert fast_decoder(object()) is None
