"""Incremental detokenization and stop strings for one sequence.

Text grows token by token without re-decoding the whole output, and without ever
emitting half a character. Two offsets into the token ids (vLLM's scheme) make that work:

    ids:   ... p3 p4 | o0 o1 o2 | o3
                ^prefix_offset  ^read_offset
    prefix_text = decode(ids[prefix:read])      text already emitted, decoded with its context
    new_text    = decode(ids[prefix:])          the same, plus the new tokens
    emitted     = new_text[len(prefix_text):]   unless it ends in "\\ufffd" (a multi-byte character
                                                split across tokens): then wait for the next token

Decoding a short window that starts a few tokens back keeps context-dependent
tokenizers right (a SentencePiece word's leading space, byte-level BPE's bytes).

Stop strings are searched only in the newly added text plus a lookback of the longest
stop string, and only once more than ``min_tokens`` tokens were generated. On a hit the
text is cut before the stop string (after it with ``include_stop_str_in_output``).
"""
from __future__ import annotations

from typing import Any

from sluice.sampling_params import SamplingParams

# Prompt tokens decoded as context for the first output token (vLLM uses 5).
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5


def fast_decoder(tokenizer: Any) -> Any:
    """The Rust ``tokenizers.Tokenizer`` whose ``decode(ids, skip_special_tokens)`` gives exactly the
    tokenizer's own ``decode``, or None. transformers' fast tokenizers add only argument conversions on
    top of it (a few microseconds a call, twice per token and request) unless they clean up spaces."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    try:
        from tokenizers import Tokenizer
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if not isinstance(backend, Tokenizer) or type(tokenizer)._decode is not TokenizersBackend._decode \
            or type(tokenizer).decode is not TokenizersBackend.decode:
        return None
    return backend


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams,
                 decoder: Any = None) -> None:
        """``decoder``: ``fast_decoder(tokenizer)`` when the caller has it (it is the same for every request)."""
        self.tokenizer = tokenizer
        self._backend_decode = decoder.decode if decoder is not None else None
        self.stop: list[str] = list(params.stop or [])
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.skip_special_tokens = params.skip_special_tokens
        # Only the prompt's tail is kept: it is the decoding context of the first output token.
        self._token_ids: list[int] = list(prompt_token_ids[-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self.output_token_ids: list[int] = []
        self.output_text = ""
        self._last_output_text_offset = 0  # for delta streaming
        # Text that could still turn into a stop string is held back while streaming.
        self.stop_buffer_length = (max((len(s) for s in self.stop), default=1) - 1
                                   if not self.include_stop_str_in_output else 0)

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Appends tokens and their text; returns the stop string that ended the text, if any.

        ``stop_terminated``: the last new token is a stop token (eos or a stop token id);
        its text is left out unless ``include_stop_str_in_output``, as vLLM does.
        """
        if not new_token_ids:
            return None
        to_decode = new_token_ids
        if stop_terminated and not self.include_stop_str_in_output:
            to_decode = new_token_ids[:-1]
        text_len_before = len(self.output_text)
        for token_id in to_decode:
            self.output_text += self._decode_next(token_id)
        self.output_token_ids.extend(new_token_ids)
        if not self.stop or len(self.output_token_ids) <= self.min_tokens:
            return None
        hit = find_stop_string(self.output_text, len(self.output_text) - text_len_before, self.stop,
                               self.include_stop_str_in_output)
        if hit is None:
            return None
        stop_str, end = hit
        self.output_text = self.output_text[:end]
        return stop_str

    def _decode_next(self, token_id: int) -> str:
        self._token_ids.append(token_id)
        prefix_text = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            # Nothing printable yet (e.g. the first bytes of a multi-byte character).
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        # The window only needs the tokens from prefix_offset on: drop the rest.
        if self._prefix_offset > 0:
            del self._token_ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text[len(prefix_text):]

    def _decode(self, token_ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to stream now: all of it (cumulative) or what is new since the last call (delta).

        While unfinished, the last ``stop_buffer_length`` characters are held back: they
        could still be the start of a stop string that must not be shown.
        """
        buffer_length = 0 if not self.stop or finished else self.stop_buffer_length
        length = len(self.output_text) - buffer_length
        if not delta:
            return self.output_text[:length] if buffer_length else self.output_text
        last_offset = self._last_output_text_offset
        if last_offset < length:
            self._last_output_text_offset = length
            return self.output_text[last_offset:length]
        return ""


def find_stop_string(text: str, new_char_count: int, stop: list[str],
                     include_in_output: bool) -> tuple[str, int] | None:
    """Finds the earliest stop string that ends inside the last ``new_char_count`` characters.

    Returns the stop string and the length to cut the text to, or None.
    """
    if new_char_count <= 0:
        return None
    best: tuple[str, int] | None = None
    for stop_str in stop:
        # A match must end in the new text, so it starts at most len(stop_str) - 1 characters earlier.
        start = max(len(text) - new_char_count - len(stop_str) + 1, 0)
        index = text.find(stop_str, start)
        if index != -1 and (best is None or index < best[1]):
            best = (stop_str, index)
    if best is None:
        return None
    stop_str, index = best
    return stop_str, index + len(stop_str) if include_in_output else index
