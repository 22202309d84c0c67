"""Offline agentic evaluation: tool-using workers, then every synthesis method on the same trajectories.

Tasks (items built from packaged data; the files agents read are written under the run's folder):
- `agent_docs`: a SQuAD question (evaluation positions) whose passage hides in one of the workers' search
  shards, among distractor passages of other articles; each worker searches its own shard (BM25).
- `agent_sql`: a generated SQLite shop database per item (customers, orders) and a question whose gold
  answer a SQL query computes: a join, an aggregate, or a planted anomaly (one order priced far off).
- `agent_mbpp`: an MBPP problem with its tests; workers may run code in the python sandbox.

Methods: `single` (the first worker's own answer: rows do not depend on their batch, so it is the agent
run alone), `text-final`, `text-trajectory`, `cache-final`, `cache-trajectory`, and with a synthesizer
that fits the model `trained-final` and `trained-trajectory`. `final` hands over each worker's final
turn, `trajectory` its every turn and tool result. Each synthesis is timed alone, as `synthesize` times
it; end-to-end latency adds the agents' wall time. Results are JSON lines, one item a line, appended as
items finish: a rerun of the same command resumes.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean, median

from .. import datasets as D
from ..adapter import resolve
from ..agents import AGENT_INSTRUCTION, run_agents
from ..files import Records, read_records, write_json
from ..model import LM
from ..sampling import SamplingParams
from ..scoring import contains_answer
from ..synthesis import synthesize
from ..tools import Toolbox, python_tool, search_tool, sql_tool
from . import stats
from . import tasks as T

AGENT_TASKS = ("agent_docs", "agent_sql", "agent_mbpp")
ROUTES = {"text": dict(route="text"), "cache": dict(route="cache", layout="parallel"), "trained": dict(route="cache")}
METHODS = ("single", *(f"{r}-{h}" for r in ROUTES for h in ("final", "trajectory")))
BUDGETS = {"agent_docs": (160, 24), "agent_sql": (192, 24), "agent_mbpp": (320, 192)}  # agent, answer tokens
SHARD_SEARCH = "Search your documents by keywords (BM25) and read the best matching passages."
ROLES = ("Work carefully.", "Be quick and direct.", "Double-check before you answer.", "Try another approach.")


@dataclass(frozen=True)
class AgentItem:
    id: str
    task: str
    kind: str                              # how the answer is scored: "span" or "code"
    question: str
    gold: tuple[str, ...] = ()
    tests: str = ""                        # code: run after the solution
    shards: tuple[tuple[dict, ...], ...] = field(default=(), repr=False)  # docs: one corpus per worker
    db: dict = field(default_factory=dict, repr=False)                    # sql: the database's rows


# ---------------------------------------------------------------- items

def _docs(n: int, seed: int, workers: int) -> list[AgentItem]:
    rows = D.squad("eval")
    rng = random.Random(seed)
    order = rng.sample(range(len(rows)), len(rows))
    items = []
    for i in order[:n]:
        r = rows[i]
        others = [rows[j] for j in rng.sample(range(len(rows)), 40) if rows[j]["title"] != r["title"]]
        passages = [{"id": f"doc-{k}", "title": o["title"], "text": o["passage"]} for k, o in enumerate(others)]
        per = max(1, min(3, len(passages) // workers))
        shards = [passages[w * per:(w + 1) * per] for w in range(workers)]
        shards[rng.randrange(workers)].insert(rng.randrange(per + 1),
                                              {"id": "doc-gold", "title": r["title"], "text": r["passage"]})
        question = (f"{r['question']}\n\nSearch the documents to find the answer, then answer with a short "
                    "phrase.")
        items.append(AgentItem(f"docs-{r['id']}", "agent_docs", "span", question, tuple(r["answers"]),
                               shards=tuple(tuple(s) for s in shards)))
    return items


PRODUCTS = ("lamp", "chair", "desk", "kettle", "shelf", "clock", "mirror", "rug")
CITIES = ("Lyon", "Porto", "Turin", "Ghent", "Bergen", "Krakow")
NAMES = ("Ada", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas")


def _shop(rng: random.Random) -> dict:
    customers = [(k + 1, name, rng.choice(CITIES)) for k, name in enumerate(rng.sample(NAMES, 6))]
    orders = []
    for k in range(30):
        product = rng.choice(PRODUCTS)
        base = 20 + 10 * PRODUCTS.index(product)
        orders.append((k + 1, rng.randrange(1, 7), product, rng.randrange(1, 6), base + rng.randrange(0, 5)))
    odd = rng.randrange(30)
    k, c, p, q, price = orders[odd]
    orders[odd] = (k, c, p, q, price * 25)  # the planted anomaly
    return {"customers": customers, "orders": orders}


SQL_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("Which customer (give the name) bought the most units in total?",
     "select c.name from orders o join customers c on c.id = o.customer_id group by c.id "
     "order by sum(o.qty) desc, c.id limit 1"),
    ("How many units of {product} were ordered in total?",
     "select coalesce(sum(qty), 0) from orders where product = '{product}'"),
    ("Which city's customers spent the most (quantity times price, summed)? Give the city.",
     "select c.city from orders o join customers c on c.id = o.customer_id group by c.city "
     "order by sum(o.qty * o.price) desc limit 1"),
    ("One order has a unit price far above every other order of the same product. What is its order id?",
     "select o.id from orders o where o.price > 5 * (select min(price) from orders p where p.product = o.product)"),
)


def _sql(n: int, seed: int, workers: int) -> list[AgentItem]:
    rng = random.Random(seed)
    items = []
    for k in range(n):
        db = _shop(rng)
        text, query = SQL_QUESTIONS[k % len(SQL_QUESTIONS)]
        product = rng.choice(PRODUCTS)
        con = sqlite3.connect(":memory:")
        _fill(con, db)
        gold = str(con.execute(query.format(product=product)).fetchone()[0])
        con.close()
        question = (f"{text.format(product=product)}\n\nThe database has the tables customers(id, name, city) and "
                    "orders(id, customer_id, product, qty, price). Query it with the sql tool, then answer "
                    "with the value alone.")
        items.append(AgentItem(f"sql-{seed}-{k}", "agent_sql", "span", question, (gold,), db=db))
    return items


def _fill(con: sqlite3.Connection, db: dict) -> None:
    con.execute("create table customers (id integer primary key, name text, city text)")
    con.execute("create table orders (id integer primary key, customer_id integer, product text, qty integer, "
                "price integer)")
    con.executemany("insert into customers values (?, ?, ?)", db["customers"])
    con.executemany("insert into orders values (?, ?, ?, ?, ?)", db["orders"])
    con.commit()


def _mbpp(n: int, seed: int, workers: int) -> list[AgentItem]:
    items = T.load("mbpp", limit=n, seed=seed)
    hint = ("You may run Python with the python tool to test your code (print what you want to see). "
            "End with the complete function in a ```python code block.")
    return [AgentItem(i.id, "agent_mbpp", "code", i.question.rsplit("\n\n", 1)[0] + "\n\n" + hint, tests=i.tests)
            for i in items]


BUILDERS: dict[str, Callable[[int, int, int], list[AgentItem]]] = {
    "agent_docs": _docs, "agent_sql": _sql, "agent_mbpp": _mbpp}


def load(task: str, *, limit: int, seed: int = 0, workers: int = 3) -> list[AgentItem]:
    if task not in BUILDERS:
        raise ValueError(f"unknown agentic task {task!r} (choose from {', '.join(AGENT_TASKS)})")
    return BUILDERS[task](limit, seed, workers)


def toolboxes(item: AgentItem, folder: Path, workers: int) -> list[Toolbox]:
    """The tools of each worker for `item`, their files written under `folder`."""
    if item.task == "agent_docs":
        boxes = []
        for w, shard in enumerate(item.shards):
            path = folder / "corpora" / f"{item.id}-{w}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(p) + "\n" for p in shard))
            boxes.append(Toolbox([search_tool(path, k=2, description=SHARD_SEARCH)]))
        return boxes
    if item.task == "agent_sql":
        path = folder / "dbs" / f"{item.id}.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            con = sqlite3.connect(path)
            _fill(con, item.db)
            con.close()
        return [Toolbox([sql_tool(path, max_rows=20)])] * workers
    return [Toolbox([python_tool()])] * workers


def score(item: AgentItem, text: str) -> bool:
    if item.kind == "code":
        probe = T.Item(item.id, "mbpp", item.question, (), tests=item.tests)
        return T.score(probe, text)
    return contains_answer(T.extract("span", text), item.gold)


# ---------------------------------------------------------------- running

@dataclass(frozen=True)
class AgenticConfig:
    tasks: tuple[str, ...] = AGENT_TASKS
    limit: int = 30
    seed: int = 0
    workers: int = 3
    max_turns: int = 3
    adapter: str = "auto"

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in AGENT_TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown agentic task(s) {', '.join(bad) or '(none given)'} "
                             f"(choose from {', '.join(AGENT_TASKS)})")
        if self.limit < 1 or not 1 <= self.workers <= len(ROLES) or self.max_turns < 0:
            raise ValueError(f"need limit >= 1, 1 to {len(ROLES)} workers and max_turns >= 0, got {self}")


def run(lm: LM, config: AgenticConfig, out: Path, *, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Evaluate (or resume) into `out`: predictions.jsonl, then summary.json (returned)."""
    out = Path(out)
    trained = resolve(lm, config.adapter)
    methods = [m for m in METHODS if not m.startswith("trained") or trained is not None]
    per_task = [load(t, limit=config.limit, seed=config.seed, workers=config.workers) for t in config.tasks]
    items = [i for round_ in zip(*per_task) for i in round_]
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out / "config.json", config)
    path = out / "predictions.jsonl"
    done = {r["id"] for r in read_records(path)}
    with Records(path) as records:
        for n, item in enumerate(items, 1):
            if item.id not in done:
                records.extend([evaluate(lm, item, config, methods, trained, out)])
            if progress:
                progress(n, len(items), item.task)
    ids = {i.id for i in items}
    summary = summarize([r for r in read_records(path) if r["id"] in ids], methods, config, lm.name)
    write_json(out / "summary.json", summary)
    return summary


def _check_config(path: Path, config: AgenticConfig) -> None:
    want = asdict(config) | {"tasks": list(config.tasks)}
    if path.exists():
        have = json.loads(path.read_text())
        if {k: v for k, v in have.items() if k != "limit"} != {k: v for k, v in want.items() if k != "limit"}:
            raise ValueError(f"{path.parent} holds a run with other settings ({have}); choose another folder")
    write_json(path, want)


def evaluate(lm: LM, item: AgentItem, config: AgenticConfig, methods: Sequence[str], trained, out: Path) -> dict:
    """One item: the agents once, then every method on their trajectories."""
    agent_tokens, answer_tokens = BUDGETS[item.task]
    t0 = time.perf_counter()
    run_ = run_agents(lm, item.question, toolboxes(item, out, config.workers), workers=config.workers,
                      roles=ROLES[: config.workers], sampling=SamplingParams(agent_tokens, 0.0),
                      max_turns=config.max_turns)
    agents_s = time.perf_counter() - t0
    record = {"id": item.id, "task": item.task, "agents_s": agents_s, "methods": {},
              "agents": [{"stopped": t.stopped, "calls": t.calls, "generated": t.generated, "tool_s": t.tool_s,
                          "ok_calls": sum(r.ok for turn in t.turns for r in turn.results)}
                         for t in run_.trajectories],
              "branch_tokens": {h: [len(b.token_ids) for b in f.branches] for h, f in run_.forks.items()}}
    first = run_.trajectories[0]
    record["methods"]["single"] = {"answer": first.answer, "score": score(item, first.answer),
                                   "ttft_s": None, "latency_s": agents_s}
    sampling = SamplingParams(answer_tokens, 0.0)
    for method in methods[1:]:
        route, handover = method.split("-")
        kw = dict(ROUTES[route], synthesizer=trained) if route == "trained" else ROUTES[route]
        s = synthesize(lm, run_.forks[handover], sampling=sampling, instruction=AGENT_INSTRUCTION, **kw)
        record["methods"][method] = {"answer": s.answer, "score": score(item, s.answer), "ttft_s": s.ttft_s,
                                     "latency_s": agents_s + s.total_s, "e2e_first_s": agents_s + s.ttft_s,
                                     "prefill_tokens": s.prefill_tokens}
    return record


def summarize(records: Sequence[dict], methods: Sequence[str], config: AgenticConfig, model: str) -> dict:
    """Per task and method: accuracy with its interval, the paired difference from text synthesis on the
    same handover, median TTFT and end-to-end times, tokens prefilled; per task: tool calls, and the
    text/cache TTFT ratio per handover."""
    tasks = {}
    for task in config.tasks:
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        entry = {"n": len(rows), "smoke": len(rows) < stats.SMOKE, "methods": {},
                 "tool_calls": fmean([sum(a["calls"] for a in r["agents"]) for r in rows]),
                 "agents_s": median([r["agents_s"] for r in rows])}
        for m in methods:
            got = [r["methods"][m] for r in rows]
            e = stats.accuracy([g["score"] for g in got])
            if m != "single":
                text = [r["methods"]["text-" + m.split("-")[1]]["score"] for r in rows]
                e |= {"vs_text": stats.paired([g["score"] for g in got], text)} if not m.startswith("text") else {}
                e |= {"ttft_s": median([g["ttft_s"] for g in got]), "prefill_tokens": fmean(
                    [g["prefill_tokens"] for g in got]), "e2e_first_s": median([g["e2e_first_s"] for g in got])}
            e["latency_s"] = median([g["latency_s"] for g in got])
            entry["methods"][m] = e
        entry["ttft_ratio"] = {h: entry["methods"][f"text-{h}"]["ttft_s"] / entry["methods"][f"cache-{h}"]["ttft_s"]
                               for h in ("final", "trajectory")}
        entry["branch_tokens"] = {h: fmean([sum(r["branch_tokens"][h]) for r in rows]) for h in ("final", "trajectory")}
        tasks[task] = entry
    return {"model": model, "config": asdict(config) | {"tasks": list(config.tasks)}, "tasks": tasks}


__all__ = ["AGENT_TASKS", "METHODS", "AgentItem", "AgenticConfig", "load", "run", "score", "summarize"]
