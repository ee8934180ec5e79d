"""Structured outputs offline, with the embedded default model (SmolLM2-135M): every constrained output follows
its JSON schema, choice, regex or grammar; unconstrained neighbours are untouched; a bad constraint fails alone."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import xgrammar as xgr

from sluice import LLM, SamplingParams, StructuredOutputsParams
from sluice.core.request import Request



PROMPT = "Reply with a JSON object describing a fictional person:"

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "string", "enum": ["yes", "no"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}, "required": ["id"],
     "additionalProperties": False},
    {"type": "object", "properties": {"status": {"const": "done"}, "count": {"type": "integer", "minimum": 1,
                                                                            "maximum": 5}},
     "required": ["status", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"enum": [2, 4]}},
     "required": ["kind", "legs"], "additionalProperties": False},
    {"type": ["integer", "null"], "minimum": 0, "maximum": 99},
]

GRAMMAR = r'''
root ::= "(" expr ")"
expr ::= term (("+" | "-") term)?
term ::= [0-9] | "x"
'''


def constrained(max_tokens: int = 48, temperature: float = 0.0, seed: int | None = None, **constraint):
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(disable_any_whitespace=True, **constraint))


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=256, device="cpu", num_kv_blocks=256, max_num_seqs=32)


def test_json_schemas_greedy_and_sampled_validate_and_unconstrained_rows_are_unchanged(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=6)
    solo = llm.generate(["The capital of France is"], plain, use_tqdm=False)[0].outputs[0].token_ids
    params = [constrained(json=schema) for schema in SCHEMAS]
    sampled = SCHEMAS[::2]
    params += [constrained(json=schema, temperature=1.0, seed=i) for i, schema in enumerate(sampled)]
    prompts = [PROMPT] * len(params) + ["The capital of France is"]
    outputs = llm.generate(prompts, params + [plain], use_tqdm=False)
    for out, schema in zip(outputs, SCHEMAS + sampled):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)
    assert outputs[-1].outputs[0].token_ids == solo
    assert llm.llm_engine.core.scheduler.kv_cache_manager.usage == 0.0


def test_choice_regex_and_grammar_outputs_match(llm):
    choices = ["alpha", "beta", "gamma"]
    params = [
        SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8,
                       structured_outputs=StructuredOutputsParams(choice=choices)),
        constrained(regex=r"\d{4}-\d{2}-\d{2}"),
        constrained(regex=r"\(\d{3}\) \d{3}-\d{4}", temperature=1.0, seed=3),
        constrained(grammar=GRAMMAR, temperature=1.0, seed=4),
        constrained(json_object=True, max_tokens=64),
    ]
    outputs = llm.generate(["Pick one:", "Today's date:", "Phone:", "Expression:", PROMPT], params, use_tqdm=False)
    assert all(c.text in choices for c in outputs[0].outputs) and len(outputs[0].outputs) == 3
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", outputs[1].outputs[0].text)
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", outputs[2].outputs[0].text)
    assert re.fullmatch(r"\((\d|x)([+-](\d|x))?\)", outputs[3].outputs[0].text)
    tokenizer = llm.llm_engine.tokenizer
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=llm.llm_engine.model_config.vocab_size)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(GRAMMAR))
    assert matcher.accept_string(outputs[3].outputs[0].text) and matcher.is_completed()
    assert outputs[4].outputs[0].finish_reason == "stop", outputs[4].outputs[0].text
    assert isinstance(json.loads(outputs[4].outputs[0].text), dict)


def test_guidance_backend_output_validates(llm):
    schema = SCHEMAS[0]
    params = SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=StructuredOutputsParams(
        json=schema, backend="guidance", disable_any_whitespace=True))
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    jsonschema.validate(json.loads(out.text), schema)


def test_auto_backend_falls_back_to_guidance_for_a_grammar_xgrammar_refuses():
    """A Lark grammar is an EBNF syntax error to xgrammar: ``auto`` compiles it with llguidance, the output follows
    it, and ``xgrammar`` alone refuses it with the parser's message."""
    lark = 'start: "(" ITEM ("," ITEM)* ")"\nITEM: /[a-z]{1,4}/\n'
    auto = LLM(max_model_len=128, device="cpu", num_kv_blocks=64, structured_outputs_backend="auto")
    params = SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=StructuredOutputsParams(grammar=lark))
    out = auto.generate(["List some short words:"], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    assert re.fullmatch(r"\([a-z]{1,4}(,[a-z]{1,4})*\)", out.text), out.text
    assert auto.llm_engine.core.scheduler.kv_cache_manager.usage == 0.0
    with pytest.raises(ValueError, match="grammar syntax error"):
        auto.generate(["x"], SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(
            grammar=lark, backend="xgrammar")), use_tqdm=False)


@pytest.mark.parametrize("constraint,needle", [
    (dict(json={"type": "foo"}), "invalid JSON schema"),
    (dict(json="{not json"), "not valid JSON"),
    (dict(regex="(abc"), "invalid regex"),
    (dict(grammar='root ::= "a" |'), "grammar syntax error"),
])
def test_invalid_constraint_is_a_value_error_and_healthy_requests_finish_unchanged(llm, constraint, needle):
    engine = llm.llm_engine
    plain = SamplingParams(temperature=0.0, max_tokens=5)
    solo = llm.generate(["Hello there"], plain, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("healthy", "Hello there", plain)
    with pytest.raises(ValueError, match=needle):
        engine.add_request("bad", "Hello there", SamplingParams(structured_outputs=StructuredOutputsParams(**constraint)))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert finished["healthy"].outputs[0].token_ids == solo and "bad" not in finished
    assert engine.core.scheduler.kv_cache_manager.usage == 0.0


def test_grammar_failing_in_the_core_finishes_that_request_with_error(llm):
    """A constraint that reaches the core unchecked (bypassing the front) fails alone: finish reason "error"."""
    core = llm.llm_engine.core
    core.add_request(Request("core-bad", [1, 2, 3], SamplingParams(
        max_tokens=4, structured_outputs=StructuredOutputsParams(regex="(abc", backend="xgrammar")), eos_token_id=2))
    core.add_request(Request("core-ok", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)))
    outputs = {}
    while core.has_unfinished_requests():
        for o in core.step():
            outputs.setdefault(o.req_id, []).append(o)
    assert outputs["core-bad"][-1].finish_reason == "error"
    assert outputs["core-ok"][-1].finish_reason == "length"
    assert sum(len(o.new_token_ids) for o in outputs["core-ok"]) == 4
    assert core.scheduler.kv_cache_manager.usage == 0.0 and core.structured_output.num_active == 0


def test_constraints_hold_under_tiny_chunks_prefix_hits_preemption_and_async_scheduling():
    llm = LLM(max_model_len=256, device="cpu", num_kv_blocks=24, block_size=4, max_num_batched_tokens=16,
              async_scheduling=True, max_num_seqs=8)
    schema = SCHEMAS[4]
    prompts = [PROMPT + " " + "x" * i for i in range(6)]
    params = [constrained(json=schema, temperature=1.0 if i % 2 else 0.0, seed=i) for i in range(6)]
    plain = SamplingParams(temperature=0.0, max_tokens=12)
    solo = llm.generate(["Once upon a time"], plain, use_tqdm=False)[0].outputs[0].token_ids
    outputs = llm.generate(prompts + ["Once upon a time"], params + [plain], use_tqdm=False)
    for out in outputs[:-1]:
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    assert outputs[-1].outputs[0].token_ids == solo
    core = llm.llm_engine.core
    assert core.make_stats().num_preemptions > 0
    assert core.scheduler.kv_cache_manager.usage == 0.0 and core.structured_output.num_active == 0


def test_async_constrained_steps_launch_the_forward_before_collecting_the_previous_step():
    """With async scheduling a constrained step's forward is queued before the previous step is collected (the
    bitmask is filled inside the runner's launch, after that collection), and the tokens equal those of the
    synchronous engine."""
    prompts = [PROMPT + " " + "y" * i for i in range(4)]
    params = [constrained(json=SCHEMAS[i % 3], max_tokens=24) for i in range(4)]
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(max_model_len=256, device="cpu", num_kv_blocks=128,
                                                    async_scheduling=False).generate(prompts + ["Once"],
                                                                                     params + [plain],
                                                                                     use_tqdm=False)]
    llm = LLM(max_model_len=256, device="cpu", num_kv_blocks=128, async_scheduling=True)
    runner = llm.llm_engine.core.runner
    events, in_launch = [], []
    launch, forward, collect = runner.launch, runner._forward, runner.collect

    def spy_launch(*args):
        in_launch.append(True)
        try:
            return launch(*args)
        finally:
            in_launch.pop()

    runner.launch = spy_launch
    runner._forward = lambda inputs: (events.append("forward"), forward(inputs))[1]
    runner.collect = lambda step: (events.append("collect in launch" if in_launch else "collect"), collect(step))[1]
    outputs = llm.generate(prompts + ["Once"], params + [plain], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for out in outputs[:-1]:
        json.loads(out.outputs[0].text)
    # Decode steps: forward(t + 1) is queued, then step t is collected inside that launch.
    pairs = list(zip(events, events[1:]))
    assert pairs.count(("forward", "collect in launch")) >= 8
    core = llm.llm_engine.core
    assert core.scheduler.kv_cache_manager.usage == 0.0 and core.structured_output.num_active == 0
