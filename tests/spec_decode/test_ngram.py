import random

import numpy as np
import pytest

from sluice.spec_decode.ngram import NgramProposer


def test_longest_suffix_match_proposes_what_followed_it():
    proposer = NgramProposer(num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3)
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 2, 6, 7]
    # suffix (6, 7) occurs at 1 and 6; trigram (2, 6, 7) never before: the most recent bigram wins -> [2, 6, 7]
    assert proposer.propose(tokens).tolist() == [2, 6, 7]
    # a trigram match beats a more recent bigram match
    tokens = [1, 2, 3, 4, 0, 2, 3, 9, 1, 2, 3]
    assert proposer.propose(tokens).tolist() == [4, 0, 2]


def test_proposals_stop_at_the_end_of_the_tokens_and_at_the_room_left():
    proposer = NgramProposer(num_speculative_tokens=5, prompt_lookup_min=2, prompt_lookup_max=2)
    tokens = [3, 4, 8, 3, 4]  # (3, 4) at 0: followed by 8, 3, 4 (the suffix itself), then nothing
    assert proposer.propose(tokens).tolist() == [8, 3, 4]
    assert proposer.propose(tokens, max_tokens=2).tolist() == [8, 3]
    assert proposer.propose(tokens, max_tokens=0).tolist() == []


def test_no_match_or_too_few_tokens_proposes_nothing():
    proposer = NgramProposer(num_speculative_tokens=2, prompt_lookup_min=2, prompt_lookup_max=4)
    assert proposer.propose([1, 2, 3, 4, 5]).size == 0
    assert proposer.propose([7, 7]).size == 0  # the suffix (7, 7) has no earlier occurrence
    assert proposer.propose([7]).size == 0
    assert [p.tolist() for p in proposer.propose_batch([[1, 2, 1, 2], [1, 2, 3]], [4, 4])] == [[1, 2], []]


def test_matches_a_brute_force_search_on_random_sequences():
    rng = np.random.default_rng(0)
    proposer = NgramProposer(num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)
    for _ in range(300):
        tokens = rng.integers(0, 4, size=int(rng.integers(1, 30))).tolist()
        expected: list[int] = []
        for n in range(min(3, len(tokens) - 1), 0, -1):
            starts = [i for i in range(len(tokens) - n) if tokens[i:i + n] == tokens[-n:]]
            if starts:
                expected = tokens[starts[-1] + n:starts[-1] + n + 4]
                break
        assert proposer.propose(tokens).tolist() == expected, tokens


@pytest.mark.parametrize("kwargs", [dict(num_speculative_tokens=0), dict(num_speculative_tokens=2,
                                    prompt_lookup_min=3, prompt_lookup_max=2),
                                    dict(num_speculative_tokens=2, prompt_lookup_min=0)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        NgramProposer(**kwargs)


def _sliding_window_reference(proposer, tokens, limit):
    """The definition: for n from the longest down, every earlier window of n tokens equal to the last n; the
    most recent one's continuation."""
    from numpy.lib.stride_tricks import sliding_window_view
    tokens = np.asarray(tokens, dtype=np.int64)
    if limit <= 0 or len(tokens) < proposer.prompt_lookup_min + 1:
        return []
    for n in range(min(proposer.prompt_lookup_max, len(tokens) - 1), proposer.prompt_lookup_min - 1, -1):
        hits = np.flatnonzero((sliding_window_view(tokens[:-1], n) == tokens[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + limit].tolist()
    return []


def test_proposals_equal_the_sliding_window_definition_on_random_token_strings():
    rng = random.Random(0)
    for _ in range(3000):
        lo = rng.randint(1, 4)
        proposer = NgramProposer(rng.randint(1, 5), lo, rng.randint(lo, 6))
        tokens = [rng.randrange(rng.choice([2, 3, 5, 50])) for _ in range(rng.randint(0, 40))]
        limit = rng.choice([None, 0, 1, 3])
        want = _sliding_window_reference(proposer, tokens, proposer.num_speculative_tokens if limit is None
                                         else min(proposer.num_speculative_tokens, limit))
        assert proposer.propose(tokens, limit).tolist() == want, (tokens, proposer, limit)
