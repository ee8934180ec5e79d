"""Structured outputs (constrained decoding): a request's output follows a JSON schema, regex, choice or grammar.

backends.py  xgrammar (default) and llguidance: syntax check, compile, per-request matcher
manager.py   StructuredOutputManager (engine core): compile thread pool and cache, the step's token bitmask
apply.py     apply_grammar_bitmask: the runner's logits hook (imports torch)
"""
from sluice.structured_output.backends import resolve_backend
from sluice.structured_output.manager import GrammarBitmask, StructuredOutputManager, StructuredOutputRequest

__all__ = ["GrammarBitmask", "StructuredOutputManager", "StructuredOutputRequest", "resolve_backend"]
