"""Agent workers: reading tool calls, offering tools through the chat template, and whole agent runs on the
embedded models (a tool turn extends the row's own K/V exactly; limits and failing tools end in messages)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from test_decode import fresh_logits
from test_workers import assert_branches_match_fresh_prefill
from transformers import DynamicCache

from parsyn.agents import parse_calls
from parsyn.chat import TOOL_PROTOCOL, ChatFormat
from parsyn.tools import Tool, Toolbox, calculator_tool


def test_calls_in_tags_are_read_in_order():
    text = ('Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>\n'
            '<tool_call>{"name": "sql", "arguments": "{\\"query\\": \\"select 1\\"}"}</tool_call>')
    calls = parse_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("calculator", {"expression": "2+3"}, None), ("sql", '{"query": "select 1"}', None)]


def test_a_turn_that_is_only_a_bare_call_object_is_a_call():
    assert parse_calls('{"name": "calculator", "arguments": {"expression": "7*6"}}')[0].arguments == {
        "expression": "7*6"}
    assert parse_calls('```json\n{"name": "calculator", "arguments": {}}\n```')[0].name == "calculator"
    # prose that mentions an object, or an object that is not a call, is an answer
    assert parse_calls('The call was {"name": "calculator", "arguments": {}}.') == []
    assert parse_calls('{"answer": 42}') == []


def test_a_call_cut_off_by_the_token_budget_is_still_read():
    assert parse_calls('<tool_call>{"name": "calculator", "arguments": {"expression": "1"}}')[0].name == "calculator"


@pytest.mark.parametrize("body, message", [
    ("{name: calculator}", "not valid JSON"),
    ('["calculator"]', 'a JSON object with a "name"'),
    ('{"arguments": {}}', 'a JSON object with a "name"'),
    ('{"name": "calculator", "arguments": [1, 2]}', '"arguments" must be a JSON object'),
])
def test_malformed_calls_carry_an_error_for_the_agent(body, message):
    (call,) = parse_calls(f"<tool_call>{body}</tool_call>")
    assert call.error is not None and call.error.startswith("error:") and message in call.error


def _round_trip(fmt: ChatFormat, question: str, results: list[str]) -> str:
    """Prefix, opening, an assistant turn that called tools, and the tool turn, as one text."""
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
    return fmt.prefix(question) + fmt.turn(question, None, None) + call + fmt.end + fmt.tool_results(
        question, None, results)


def test_a_template_without_tools_gets_the_text_protocol(tokenizer):
    box = Toolbox([calculator_tool()])
    fmt = ChatFormat(tokenizer, tuple(box.schemas()))
    assert not fmt.native_tools
    prefix = fmt.prefix("What is 2+3?")
    assert TOOL_PROTOCOL.split("{schemas}")[0] in prefix and '"calculator"' in prefix
    text = _round_trip(fmt, "What is 2+3?", ["5"])
    assert text.endswith(fmt.turn("What is 2+3?", None, None)) and "<tool_response>\n5\n</tool_response>" in text
    assert ChatFormat(tokenizer).prefix("What is 2+3?") != prefix  # no tools, no protocol


@pytest.mark.slow
def test_qwen_s_template_renders_tools_and_tool_turns_natively(qwen):
    box = Toolbox([calculator_tool()])
    fmt = ChatFormat(qwen.tokenizer, tuple(box.schemas()))
    assert fmt.native_tools
    question = "What is 2+3?"
    text = _round_trip(fmt, question, ["5", "error: bad"])
    # the segments concatenate to what the template renders for the whole conversation
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
    whole = qwen.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": call},
         {"role": "tool", "content": "5"}, {"role": "tool", "content": "error: bad"}],
        tools=box.schemas(), tokenize=False, add_generation_prompt=True)
    assert text == whole and TOOL_PROTOCOL.split("{schemas}")[0] not in text
    assert json.loads(json.dumps(box.schemas()))[0]["function"]["name"] == "calculator"


QUESTION = "What is 123456 * 789? Use the calculator tool."
PRODUCT = "97406784"


def _agents(lm, box, **kw):
    from parsyn.agents import run_agents
    from parsyn.sampling import SamplingParams

    kw.setdefault("sampling", SamplingParams(max_new_tokens=64))
    return run_agents(lm, QUESTION, box, **kw)


@pytest.mark.slow
def test_a_tool_turn_extends_the_worker_s_own_kv_as_a_fresh_prefill_would(qwen):
    seen = []
    run = _agents(qwen, Toolbox([calculator_tool()]), workers=2, roles=["Answer with the number.", None],
                  max_turns=2, handover="trajectory", on_turn=lambda w, t: seen.append((w, t)))
    results = [r.text for t in run.trajectories for turn in t.turns for r in turn.results]
    assert PRODUCT in results  # the calculator ran on the agent's own call
    assert sum(len(t.turns) for t in run.trajectories) == len(seen)  # every turn was reported as it ended
    called = next(b for b, t in zip(run.fork.branches, run.trajectories) if t.calls)
    assert PRODUCT in qwen.tokenizer.decode(called.token_ids)  # the result is inside the branch, with its K/V
    (at, n), *_ = called.tools  # and marked as a tool's
    assert PRODUCT in qwen.tokenizer.decode(called.token_ids[at : at + n])
    assert_branches_match_fresh_prefill(qwen, run.fork, atol=2e-4)
    # the logits after the whole trajectory, from the composed K/V, are the fresh prefill's
    ids = list(run.fork.prefix_ids) + list(called.token_ids)
    cache = DynamicCache()
    for layer, (pk, pv, k, v) in enumerate(zip(run.fork.prefix.keys, run.fork.prefix.values,
                                               called.kv.keys, called.kv.values)):
        cache.update(torch.cat([pk, k], 2)[:, :, :-1], torch.cat([pv, v], 2)[:, :, :-1], layer)
    with torch.inference_mode():
        step = qwen.model(input_ids=torch.tensor([ids[-1:]]), cache=cache, use_cache=True,
                          position_ids=torch.tensor([[len(ids) - 1]])).logits[0, -1].float()
    torch.testing.assert_close(step, fresh_logits(qwen, ids), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_final_handover_keeps_the_final_turn_right_after_the_opening(qwen):
    run = _agents(qwen, Toolbox([calculator_tool()]), workers=1, max_turns=1, handover="final")
    (t,), (b,) = run.trajectories, run.fork.branches
    assert t.calls >= 1 and len(t.turns) >= 2
    start = len(run.fork.prefix_ids)
    assert b.kv.length == len(b.token_ids) and b.kv.positions.tolist() == list(range(start, start + b.kv.length))
    assert PRODUCT not in qwen.tokenizer.decode(b.token_ids) or PRODUCT in t.turns[-1].text


def _failing(kind: str) -> Tool:
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression."""
        if kind == "raises":
            raise RuntimeError("the calculator broke")
        if kind == "hangs":
            time.sleep(30)
        return "7" * 1_000_000

    return Tool.from_function(calculator, timeout_s=0.5, max_chars=600)


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("raises", "error: RuntimeError: the calculator broke"),
    ("hangs", "error: calculator did not finish within 0.5 s and was abandoned"),
    ("megabytes", "7777"),
])
def test_a_failing_tool_ends_in_a_message_the_agent_reads_and_every_worker_finishes(qwen, kind, message):
    t0 = time.perf_counter()
    run = _agents(qwen, Toolbox([_failing(kind)]), workers=2, roles=["Answer with the number.", None], max_turns=1)
    assert time.perf_counter() - t0 < 60
    results = [r for t in run.trajectories for turn in t.turns for r in turn.results]
    assert results and any(r.text.startswith(message) for r in results)
    if kind == "megabytes":
        assert any(r.truncated and len(r.text) < 1000 for r in results)
    assert len(run.fork.branches) == 2 and all(t.turns for t in run.trajectories)  # nobody's work is lost
    for t in run.trajectories:
        assert t.stopped in ("answer", "max_turns", "length")


@pytest.mark.slow
def test_an_agent_that_keeps_calling_is_stopped_at_its_turn_limit(qwen):
    run = _agents(qwen, Toolbox([calculator_tool()]), workers=1, max_turns=1)
    (t,) = run.trajectories
    texts = [r.text for turn in t.turns for r in turn.results]
    assert t.calls >= 1 and len(t.turns) <= 3
    if t.stopped == "max_turns":
        assert any("limit of 1 tool turns" in x for x in texts)
    assert t.generated <= 64


def test_tool_results_are_their_own_spans_in_the_provenance():
    from parsyn.compose import Span, mark_tools

    spans = (Span("prefix", 0, 0, 5, "reused"), Span("branch", 1, 5, 2, "recomputed"),
             Span("branch", 1, 7, 8, "mapped"), Span("branch", 2, 5, 4, "mapped"),
             Span("prompt", 0, 15, 3, "recomputed"))
    marked = mark_tools(spans, [((3, 4),), ()])
    assert [(s.source, s.index, s.start, s.length, s.how) for s in marked] == [
        ("prefix", 0, 0, 5, "reused"), ("branch", 1, 5, 2, "recomputed"), ("branch", 1, 7, 1, "mapped"),
        ("tool", 1, 8, 4, "mapped"), ("branch", 1, 12, 3, "mapped"), ("branch", 2, 5, 4, "mapped"),
        ("prompt", 0, 15, 3, "recomputed")]
    assert sum(s.length for s in marked) == sum(s.length for s in spans)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["agent", "Why?", "--tools", "python,telepathy"], "unknown tool telepathy"),
    (["agent", "Why?", "--tools", "sql"], "the sql tool needs --db FILE"),
    (["agent", "Why?", "--tools", "sql", "--db", "no/such.db"], "no SQLite database file at"),
    (["agent", "Why?", "--tools", "search"], "the search tool needs --docs PATH"),
    (["agent", "Why?", "--tools", "search", "--docs", "no/such/folder"], "no/such/folder"),
    (["agent", "Why?", "--route", "auto"], "--route auto is not offered for agents"),
    (["agent", "Why?", "--workers", "0"], "need at least one worker"),
])
def test_the_agent_command_refuses_bad_input_in_one_line(args, message, capsys, monkeypatch):
    from test_cli import refused

    code, stderr = refused(args, True, capsys, monkeypatch)
    lines = stderr.strip().splitlines()
    assert code != 0 and len(lines) == 1 and message in lines[0] and "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_the_agent_command_reports_every_turn_as_json():
    from test_cli import parsyn

    done = parsyn("agent", QUESTION, "--workers", "2", "--max-turns", "1", "--max-new-tokens", "48",
                  "--answer-tokens", "24", "--handover", "trajectory", "--synth-tool-turns", "1",
                  "--model", "qwen2.5-coder-0.5b", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["handover"] == "trajectory" and len(report["agents"]) == len(report["branches"]) == 2
    turns = [turn for a in report["agents"] for turn in a["turns"]]
    assert any(r["text"] == PRODUCT for turn in turns for r in turn["results"])
    assert any(c["name"] == "calculator" for turn in turns for c in turn["calls"])
    cache = report["routes"]["cache"]
    assert "tool" in [p["source"] for p in cache["provenance"]] and report["routes"]["text"]["answer"]
    # the synthesizer may call the tools itself: each route's own tool turns, every call it made answered
    assert set(report["synthesizer_turns"]) == {"text", "cache"}
    assert all(len(t["results"]) == len(t["calls"]) for ts in report["synthesizer_turns"].values() for t in ts)


@pytest.mark.slow
@pytest.mark.parametrize("example", ["sql_agents.py", "research_docs.py", "code_with_tests.py"])
def test_the_examples_run_to_the_end(example):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / example
    done = subprocess.run([sys.executable, str(script), "--model", "smollm2-135m", "--tokens", "40"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "text " in done.stdout and "cache (" in done.stdout and "ms to first token" in done.stdout
