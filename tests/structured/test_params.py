"""StructuredOutputsParams, the server's mapping onto it, resolve_backend and W7: no model needed."""
from __future__ import annotations

import pickle

import pytest

from sluice import SamplingParams, StructuredOutputsParams
from sluice.bench.datasets import STRUCTURED_SCHEMAS, generate_workload
from sluice.entrypoints.openai.errors import OpenAIError
from sluice.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from sluice.entrypoints.openai.sampling import structured_outputs_params
from sluice.structured_output import resolve_backend


@pytest.mark.parametrize("kwargs", [{}, {"json": {}, "regex": "a"}, {"choice": ["a"], "json_object": True}])
def test_exactly_one_constraint_else_value_error_naming_the_fields(kwargs):
    with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar, json_object, structural_tag"):
        StructuredOutputsParams(**kwargs)


def test_params_survive_the_pickle_that_carries_them_to_the_core_process():
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    assert pickle.loads(pickle.dumps(params)).structured_outputs == params.structured_outputs
    assert params.clone().structured_outputs == params.structured_outputs


def test_server_fields_map_onto_one_constraint():
    schema = {"type": "object"}
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}})
    assert structured_outputs_params(chat) == StructuredOutputsParams(json=schema)
    text = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                 "response_format": {"type": "text"}})
    assert structured_outputs_params(text) is None
    legacy = CompletionRequest.model_validate({"prompt": "x", "guided_regex": "a+", "guided_decoding_backend":
                                               "llguidance"})
    assert structured_outputs_params(legacy) == StructuredOutputsParams(regex="a+", backend="guidance")
    vllm = CompletionRequest.model_validate({"prompt": "x", "structured_outputs": {"json": '{"type": "object"}'}})
    assert structured_outputs_params(vllm).json == '{"type": "object"}'
    both = CompletionRequest.model_validate({"prompt": "x", "guided_json": schema,
                                             "response_format": {"type": "json_object"}})
    with pytest.raises(OpenAIError, match="give one constraint"):
        structured_outputs_params(both)


@pytest.mark.parametrize("backend", ["xgrammar", "guidance", "auto"])
@pytest.mark.parametrize("constraint,needle", [
    (dict(json={"type": "foo"}), "invalid JSON schema"),
    (dict(regex="(abc"), "invalid regex"),
])
def test_bad_specs_are_value_errors_naming_the_problem_on_every_backend(backend, constraint, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_backend(StructuredOutputsParams(**constraint), backend)


def test_auto_takes_xgrammar_when_it_accepts_the_spec():
    assert resolve_backend(StructuredOutputsParams(choice=["a", "b"]), "auto") == "xgrammar"
    assert resolve_backend(StructuredOutputsParams(grammar='start: "a"'), "guidance") == "guidance"


def test_a_constraint_checked_once_is_not_parsed_again_and_a_bad_one_fails_every_time(monkeypatch):
    from sluice.structured_output import backends
    parsed = []
    check = backends.XgrammarBackend.check_syntax
    monkeypatch.setattr(backends.XgrammarBackend, "check_syntax",
                        staticmethod(lambda *args: parsed.append(args) or check(*args)))
    backends._checked_backend.cache_clear()
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}}
    for _ in range(3):  # the same schema, as another dict each time
        assert resolve_backend(StructuredOutputsParams(json=dict(schema)), "xgrammar") == "xgrammar"
    assert len(parsed) == 1
    assert resolve_backend(StructuredOutputsParams(json=schema, disable_any_whitespace=True), "xgrammar") == "xgrammar"
    assert len(parsed) == 2  # another grammar: whitespace is part of the key
    for _ in range(2):
        with pytest.raises(ValueError, match="invalid regex"):
            resolve_backend(StructuredOutputsParams(regex="(abc"), "xgrammar")
    assert len(parsed) == 4


def test_w7_constrains_every_w1_request_and_fractions_keep_the_lengths():
    w1 = generate_workload("W1", 1000, num_prompts=50)
    w7 = generate_workload("W7", 1000, num_prompts=50)
    assert [(r.prompt_token_ids, r.output_len) for r in w7] == [(r.prompt_token_ids, r.output_len) for r in w1]
    assert all(r.json_schema in STRUCTURED_SCHEMAS for r in w7)
    mixed = generate_workload("W1", 1000, num_prompts=200, structured_fraction=0.25)
    assert 25 <= sum(r.json_schema is not None for r in mixed) <= 75
    assert all(r.json_schema is None for r in w1)


def test_compiled_grammar_cache_is_bounded_lru_and_does_not_keep_failures():
    from sluice.config import EngineArgs, create_engine_config
    from sluice.structured_output.manager import StructuredOutputManager

    config = create_engine_config(EngineArgs(device="cpu"))
    manager = StructuredOutputManager(config.model, "xgrammar", max_cached=2)
    try:
        first = manager.compile_async(StructuredOutputsParams(choice=["a", "b"]))
        manager.compile_async(StructuredOutputsParams(choice=["c"]))
        assert manager.compile_async(StructuredOutputsParams(choice=["a", "b"])) is first  # a hit, now newest
        manager.compile_async(StructuredOutputsParams(choice=["d"]))  # evicts ["c"], the least recently used
        assert len(manager._compiled) == 2
        assert manager.compile_async(StructuredOutputsParams(choice=["a", "b"])) is first
        first.result(timeout=60)
        bad = StructuredOutputsParams(regex="(abc", backend="xgrammar")
        failed = manager.compile_async(bad)
        with pytest.raises(ValueError):
            failed.result(timeout=60)
        assert manager.compile_async(bad) is not failed  # an error is compiled (and reported) again
    finally:
        manager.shutdown()
