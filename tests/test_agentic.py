"""The offline agentic evaluation: its items are built from packaged data with checkable gold answers, and
a run on the default model resumes and summarizes every method on the same trajectories."""

from __future__ import annotations

import json
import sqlite3

import pytest

from parsyn.eval import agentic as A


def test_docs_items_hide_the_gold_passage_in_exactly_one_worker_s_shard():
    items = A.load("agent_docs", limit=5, workers=3)
    assert len({i.id for i in items}) == 5
    for item in items:
        assert len(item.shards) == 3
        holders = [w for w, shard in enumerate(item.shards) for p in shard if p["id"] == "doc-gold"]
        assert len(holders) == 1
        gold = next(p for p in item.shards[holders[0]] if p["id"] == "doc-gold")
        assert any(g in gold["text"] for g in item.gold)  # the answer is in the hidden passage
    assert A.load("agent_docs", limit=5, workers=3) == items  # the same seed gives the same items


def test_docs_workers_search_their_own_shard_with_one_schema(tmp_path):
    (item,) = A.load("agent_docs", limit=1, workers=3)
    boxes = A.toolboxes(item, tmp_path, 3)
    assert all(b.schemas() == boxes[0].schemas() for b in boxes)
    holder = next(w for w, shard in enumerate(item.shards) if any(p["id"] == "doc-gold" for p in shard))
    query = item.question.split("\n")[0]
    found = [b.call("search", {"query": query}).text for b in boxes]
    assert "doc-gold" in found[holder] and all("doc-gold" not in f for w, f in enumerate(found) if w != holder)


def test_sql_gold_answers_are_what_the_query_gives_on_the_written_database(tmp_path):
    items = A.load("agent_sql", limit=8, workers=2)
    for item in items:
        (box, _) = A.toolboxes(item, tmp_path, 2)
        con = sqlite3.connect(tmp_path / "dbs" / f"{item.id}.sqlite")
        assert con.execute("select count(*) from orders").fetchone()[0] == 30
        if "far above" in item.question:  # the planted anomaly is one order
            (odd,) = con.execute("select id from orders o where price > 5 * (select min(price) from orders p "
                                 "where p.product = o.product)").fetchall()
            assert item.gold == (str(odd[0]),)
        con.close()
        result = box.call("sql", {"query": "select count(*) as n from customers"})
        assert result.ok and "6" in result.text
    assert len({i.question.split("\n")[0][:20] for i in items}) >= 4  # every kind of question appears


def test_scoring_reads_short_answers_and_runs_code():
    docs = A.AgentItem("x", "agent_docs", "span", "?", ("Denver Broncos",))
    assert A.score(docs, "The answer is the Denver Broncos.") and not A.score(docs, "Carolina Panthers")
    (mbpp,) = A.load("agent_mbpp", limit=1)
    assert "python tool" in mbpp.question and not A.score(mbpp, "```python\ndef nothing(): pass\n```")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown agentic task"):
        A.AgenticConfig(tasks=("agent_web",))
    with pytest.raises(ValueError, match="workers"):
        A.AgenticConfig(workers=0)


@pytest.mark.slow
def test_a_run_resumes_and_compares_every_method_on_the_same_trajectories(qwen, tmp_path):
    config = A.AgenticConfig(tasks=("agent_sql",), limit=1, workers=2, max_turns=1, adapter="none")
    summary = A.run(qwen, config, tmp_path)
    (record,) = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert set(record["methods"]) == {"single", "text-final", "text-trajectory", "cache-final", "cache-trajectory"}
    entry = summary["tasks"]["agent_sql"]
    assert entry["n"] == 1 and entry["smoke"] and set(entry["ttft_ratio"]) == {"final", "trajectory"}
    m = record["methods"]
    assert m["text-trajectory"]["prefill_tokens"] > m["cache-trajectory"]["prefill_tokens"]
    assert sum(record["branch_tokens"]["trajectory"]) >= sum(record["branch_tokens"]["final"])
    from parsyn.eval.report import write_report

    page = write_report(tmp_path).read_text()
    assert "agentic evaluation" in page and "show the harness, not a result" in page and "data:image/png" in page
    again = A.run(qwen, config, tmp_path)  # resumed: nothing new runs, the same summary comes back
    assert again == summary and len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="other settings"):
        A.run(qwen, A.AgenticConfig(tasks=("agent_sql",), limit=1, workers=3, adapter="none"), tmp_path)
