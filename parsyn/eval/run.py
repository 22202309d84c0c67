"""The evaluation harness: workers run once per item, every method synthesizes from those same branches.

Methods:
- `single`: one agent answers alone, greedily, with a worker's token budget (no workers, no synthesis);
- `vote`: majority voting over the workers' final answers (the paper's baseline; no synthesis, so no
  time to first token beyond the workers');
- `text`: text synthesis, the baseline (all branch texts prefilled again);
- `cache-parallel`, `cache-sequential`: raw cache routes;
- `cache-trained`: the cache route with the trained synthesizer (when one fits the model), in its layout;
- `cache-lora`, `cache-lora-seq`: the same synthesizer's LoRA alone, its mapper switched off (parallel,
  sequential layout) — the ablation the fidelity check runs, on the evaluation's items;
- `cacheblend`: CacheBlend-style selective recompute of the ~15% most deviating branch tokens;
- `ape`: APE-style training-free attention temperature and scale on branch spans (parallel layout);
- `cache-recompute`: the cache route with the first 8 tokens of every branch recomputed (parallel);
- `relay`: RelayCaching-style (2026): the positions where prefix-induced drift concentrates, each
  branch's first tokens, plus the 5% of branch tokens whose K/V drifted most at layer 1, recomputed
  (sequential layout, as one agent's output follows another's).

Token budgets are chosen per task kind (`BUDGETS`) unless the config sets them. Accuracy comes with a 95%
bootstrap interval, and every method is compared with text synthesis on the same items (`stats.py`).

Agreement with text synthesis compares the final answers (the number, choice, span or program each text
commits to); `identical` counts answers whose whole text is the same. Rows of task `all` pool every item.

Predictions go to predictions.jsonl, one line per finished item holding every method's answer, score
and timings; a killed run resumes after its last complete line, counting nothing twice.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..adapter import Synthesizer, resolve
from ..decode import Batch, Row
from ..files import Records, read_json, read_records, write_json
from ..model import LM
from ..sampling import ITEM_SEEDS, SamplingParams, item_seed
from ..synthesis import FIRST_TOP, CacheOptions, prepare, top_logprobs
from ..workers import answer_text, fork, fork_many, from_ids
from . import tasks as T
from .bench import environment
from .summary import chance, summarize

METHODS = ("single", "vote", "text", "cache-parallel", "cache-sequential", "cache-trained", "cache-recompute",
           "cacheblend", "ape", "relay", "cache-lora", "cache-lora-seq", "text-reversed")
# methods that need the trained synthesizer: (its mapper kept, layout; None: the layout it was trained for)
TRAINED = {"cache-trained": (True, None), "cache-lora": (False, "parallel"), "cache-lora-seq": (False, "sequential")}
# (worker tokens, answer tokens) by task kind: room to reason where the task needs it, short answers elsewhere
BUDGETS = {"choice": (64, 12), "yesno": (48, 8), "span": (48, 16), "number": (192, 32), "math": (224, 48),
           "code": (256, 256)}
ROLES = ("Solve it step by step.", "Answer directly and briefly.", "Check the question carefully, then answer.",
         "Explain your reasoning, then give the answer.")
APE = CacheOptions(temperature=0.9, branch_bias=math.log(0.8))
BLEND = CacheOptions(blend=0.15, check_layer=1)
RECOMPUTE = CacheOptions(recompute=8)
RELAY = CacheOptions(recompute=8, blend=0.05, check_layer=1)
ADDING = "adding methods"  # what `progress` reports while a rerun adds methods to finished items
GROUP = 4  # items of one task evaluated together (their decoding batched; every TTFT is still taken alone)


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...]
    methods: tuple[str, ...] = METHODS
    limit: int | None = 20
    seed: int = 0
    workers: int = 3
    worker_tokens: int | None = None  # None: by task kind (BUDGETS)
    answer_tokens: int | None = None
    temperature: float = 0.7
    adapter: str = "auto"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)} (choose from {', '.join(METHODS)})")
        known = set(T.TASKS)
        bad = [t for t in self.tasks if t not in known]
        if bad or not self.tasks:
            raise ValueError(f"unknown task(s) {', '.join(bad) or '(none given)'} "
                             f"(choose from {', '.join(sorted(known))})")
        if self.workers < 1 or any(n is not None and n < 1 for n in (self.worker_tokens, self.answer_tokens)):
            raise ValueError(f"EvalConfig needs positive workers and token limits, got {self}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1 item per task, got {self.limit}")
        SamplingParams(self.worker_tokens or 1, self.temperature, 0.95, self.seed)  # the workers' sampling: valid

    def budget(self, task: str) -> tuple[int, int]:
        """(worker tokens, answer tokens) for `task`."""
        workers, answer = BUDGETS[T.task(task).kind]
        return self.worker_tokens or workers, self.answer_tokens or answer


def run(lm: LM, config: EvalConfig, out: Path, *, command: str = "",
        progress: Callable[[int, int, str], None] | None = None, shards=None) -> dict:
    """Evaluate (or resume) into `out`; returns the summary (also written to out/summary.json after every
    group of items, so a stopped run leaves the summary of what it finished, `items` saying how much). Items are
    taken in turn from each task, so a run stopped early has about as many items of every task.
    progress(done, total, what): what is the item's task, then ADDING while methods are added to finished items.
    shards: None evaluates here; a `parsyn.eval.shard.Shards` evaluates the groups on Ray actors (records
    written as each group finishes; the same records, the same summary)."""
    out = Path(out)
    trained = resolve(lm, config.adapter) if TRAINED.keys() & set(config.methods) else None  # refusals come first,
    methods = [m for m in config.methods if m not in TRAINED or trained is not None]  # before any file
    per_task = [T.load(task, limit=config.limit, seed=config.seed, parts=config.workers) for task in config.tasks]
    items = [item for round_ in itertools.zip_longest(*per_task) for item in round_ if item is not None]
    _check_config(out / "config.json", config)
    path = out / "predictions.jsonl"
    done, every = {r["id"]: r for r in read_predictions(path)}, list(groups(items, len(config.tasks)))
    todo = [g for g in every if any(item.id not in done for item in g)]  # a group runs whole, so its numbers
    n = sum(len(g) for g in every) - sum(len(g) for g in todo)               # never depend on where a run stopped
    if progress and n:
        progress(n, len(items), items[0].task)
    with Records(path) as records:
        for group, fresh in _fresh(lm, todo, config, methods, trained, shards):
            records.extend(r for item, r in zip(group, fresh) if item.id not in done)
            _summary(lm, config, methods, path, every, command)  # so far: a report can be made at any time
            for item in group:
                n += 1
                if progress:
                    progress(n, len(items), item.task)
        short = [[item for item in group if item.id in done and "prefix_ids" in done[item.id]
                  and set(methods) - set(done[item.id]["methods"])] for group in every]
        added, adding = 0, sum(map(len, short))
        for group in filter(None, short):
            records.extend(complete_items(lm, group, [done[i.id] for i in group], config, methods, trained))
            _summary(lm, config, methods, path, every, command)  # methods added so far, as above
            added += len(group)
            if progress:
                progress(added, adding, ADDING)
    return _summary(lm, config, methods, path, every, command)


def _summary(lm: LM, config: EvalConfig, methods: Sequence[str], path: Path, every: Sequence[list[T.Item]],
             command: str) -> dict:
    """The summary of the items finished so far (rows in the order one process writes them), written beside
    `path`; `items` counts the finished and all."""
    order = {item.id: k for k, item in enumerate(item for g in every for item in g)}
    rows = sorted((r for r in read_predictions(path) if r["id"] in order), key=lambda r: order[r["id"]])
    summary = {**summarize(rows, config, methods, environment(lm), command),
               "items": {"finished": len(rows), "total": len(order)}, "chance": chance(i for g in every for i in g)}
    write_json(path.parent / "summary.json", summary)
    return summary


def _fresh(lm: LM, todo: Sequence[list[T.Item]], config: EvalConfig, methods: Sequence[str],
           trained: Synthesizer | None, shards) -> Iterator[tuple[Sequence[T.Item], list[dict]]]:
    """(group, its records) for every group to evaluate: here, in order, or on `shards` as they finish."""
    if shards is not None:
        yield from shards.evaluate(lm, todo, config, methods)
        return
    for group in todo:
        yield group, evaluate_items(lm, group, config, methods, trained)


def groups(items: Sequence[T.Item], tasks: int) -> Iterator[list[T.Item]]:
    """The items in groups of up to GROUP of one task, evaluated together: the items of GROUP rounds,
    task by task (the same groups whatever a run has done)."""
    for start in range(0, len(items), GROUP * tasks):
        block = items[start:start + GROUP * tasks]
        for task in dict.fromkeys(item.task for item in block):
            yield [item for item in block if item.task == task]


def evaluate_items(lm: LM, items: Sequence[T.Item], config: EvalConfig, methods: Sequence[str],
                   trained: Synthesizer | None) -> list[dict]:
    """Records of `items` (one task): all their workers decode as one batch, the single agents (greedy,
    a worker's room) beside them, then every method of every item as in `_syntheses`."""
    worker_tokens, _ = config.budget(items[0].task)
    alone = "single" in methods
    questions, roles, samplings = [], [], []
    for item in items:
        questions += [item.question] * (1 + alone)
        roles += [worker_roles(item, config.workers), [None]][: 1 + alone]
        samplings += [SamplingParams(worker_tokens, config.temperature, 0.95, item_seed(config.seed, item.id)),
                      SamplingParams(worker_tokens, 0.0)][: 1 + alone]
    times: dict[int, list[float]] = {}
    t0 = time.perf_counter()
    forks = fork_many(lm, questions, roles=roles, sampling=samplings,
                      on_token=lambda q, *_: times.setdefault(q, []).append(time.perf_counter()))
    workers_s = time.perf_counter() - t0
    step = 1 + alone
    singles = [_single(forks[j + 1], times[j + 1][0] - t0, times[j + 1][-1] - t0) if alone else None
               for j in range(0, len(forks), step)]
    results = _methods(lm, items, forks[::step], config, methods, trained, [{}] * len(items), singles)
    return [{"id": item.id, "task": item.task, "question": item.question, "gold": list(item.gold),
             "prefix_ids": list(f.prefix_ids),
             "branches": [{"role": b.role, "text": b.text, "tokens": len(b.token_ids), "token_ids": list(b.token_ids)}
                          for b in f.branches],
             "workers_s": workers_s, "methods": got} for item, f, got in zip(items, forks[::step], results)]


def worker_roles(item: T.Item, workers: int) -> list[str]:
    """The workers' instructions: one evidence part each where the item splits its evidence, else roles."""
    if item.evidence:
        return [f"Evidence: {part}\nAnswer the question using this evidence." for part in item.evidence]
    return [ROLES[i % len(ROLES)] for i in range(workers)]


def complete_items(lm: LM, items: Sequence[T.Item], records: Sequence[dict], config: EvalConfig,
                   methods: Sequence[str], trained: Synthesizer | None) -> list[dict]:
    """`records` with the methods they lack (a synthesizer that fits the model now, say) run on their very
    branches, rebuilt from their token ids, all synthesized together; what they hold is kept as it is."""
    forks = [from_ids(lm, item.question, r["prefix_ids"], [b["token_ids"] for b in r["branches"]],
                      texts=[b["text"] for b in r["branches"]], roles=[b["role"] for b in r["branches"]])
             for item, r in zip(items, records)]
    results = _methods(lm, items, forks, config, methods, trained, [r["methods"] for r in records])
    return [{**r, "methods": got} for r, got in zip(records, results)]


def _methods(lm: LM, items: Sequence[T.Item], forks: Sequence, config: EvalConfig, methods: Sequence[str],
             trained: Synthesizer | None, haves: Sequence[dict], singles: Sequence[dict | None] = ()) -> list[dict]:
    """Each item's method results: those it has, and the rest run (items of one task, synthesized together)."""
    worker_tokens, answer_tokens = config.budget(items[0].task)
    todo = [[m for m in methods if m not in have] for have in haves]
    jobs = [((j, m), f) for j, (f, mine) in enumerate(zip(forks, todo)) for m in mine if m not in ("single", "vote")]
    fresh = _syntheses(lm, jobs, SamplingParams(answer_tokens, 0.0), trained)
    out = []
    for j, (item, f, have, mine) in enumerate(zip(items, forks, haves, todo)):
        if "vote" in mine:
            fresh[j, "vote"] = _vote(item, f)
        if "single" in mine:  # one agent alone gets a worker's room to reason, greedily
            fresh[j, "single"] = ((singles[j] if singles else None)
                                  or _single_alone(lm, item, SamplingParams(worker_tokens, 0.0)))
        results = {**have, **{m: fresh[j, m] for m in mine}}
        for method in mine:
            r = results[method]
            r["score"], r["final"] = T.score(item, r["answer"]), final_answer(item, r["answer"])
        text = results.get("text")
        for method, r in results.items():
            compared = text is not None and method != "single"
            r["agrees"] = r["final"] == text["final"] if compared else None
            r["identical"] = r["answer"] == text["answer"] if compared else None
        out.append(results)
    return out


CACHE_METHODS = {
    "text": dict(route="text"),
    "cache-parallel": dict(route="cache", layout="parallel"),
    "cache-sequential": dict(route="cache", layout="sequential"),
    "cacheblend": dict(route="cache", layout="sequential", options=BLEND),
    "ape": dict(route="cache", layout="parallel", options=APE),
    "cache-recompute": dict(route="cache", layout="parallel", options=RECOMPUTE),
    "relay": dict(route="cache", layout="sequential", options=RELAY),
    "text-reversed": dict(route="text"),
}
REVERSED = {"text-reversed"}  # text with the branches backwards: an order that means nothing, so text's own noise


def _syntheses(lm: LM, jobs: Sequence[tuple[tuple, object]], sampling: SamplingParams,
               trained: Synthesizer | None) -> dict:
    """Run each job ((key, method), fork) alone up to its first token, timed as `synthesize` times it,
    then decode them all to the end together (one batch per adapter: a forward per step for every row).
    Greedy answers are those of one-by-one decoding up to float rounding; latency counts the joint decode."""
    started = {}
    variants = _variants(trained)
    for key, f in jobs:
        synthesizer, layout = variants.get(key[-1], (None, None))
        route = dict(route="cache", synthesizer=synthesizer, layout=layout) if synthesizer else CACHE_METHODS[key[-1]]
        if key[-1] in REVERSED:
            f = dataclasses.replace(f, branches=f.branches[::-1])
        t0 = time.perf_counter()
        ready = prepare(lm, f, max_new_tokens=sampling.max_new_tokens, **route)
        batch = Batch(lm, ready.state, ready.logits, [Row(key, sampling)], adapter=synthesizer)
        first = batch.sample_()[0]
        started[key] = (batch, ready, time.perf_counter() - t0, first.finish)
    latency = {key: ttft for key, (_, _, ttft, finish) in started.items() if finish}
    by_adapter: dict = {}
    for batch, *_ in started.values():
        by_adapter.setdefault(id(batch.adapter), []).append(batch)
    results = {}
    for joint, *others in by_adapter.values():
        t1 = time.perf_counter()
        for other in others:
            joint.add(other)
        joint.advance_()
        for events in joint.steps():
            for e in events:
                if e.finish:
                    latency[e.key] = started[e.key][2] + time.perf_counter() - t1
        results.update(joint.results)
    return {key: {"answer": answer_text(lm, results[key]), "ttft_s": ttft, "latency_s": latency[key],
                  "prefill_tokens": ready.prefill_tokens, "provenance": [asdict(p) for p in ready.spans],
                  "first_top": [list(t) for t in top_logprobs(ready.logits[0], FIRST_TOP)]}
            for key, (_, ready, ttft, _) in started.items()}


def _variants(trained: Synthesizer | None) -> dict[str, tuple[Synthesizer, str | None]]:
    """The synthesizer each TRAINED method runs, with its layout (none without a trained synthesizer)."""
    if trained is None:
        return {}
    lora_only = dataclasses.replace(trained, mapper=None)
    return {m: (trained if keep else lora_only, layout) for m, (keep, layout) in TRAINED.items()}


def _single(alone, ttft_s: float, latency_s: float) -> dict:
    b = alone.branches[0]
    return {"answer": b.text, "ttft_s": ttft_s, "latency_s": latency_s,
            "prefill_tokens": len(alone.prefix_ids) + len(b.token_ids) - b.generated}


def _single_alone(lm: LM, item: T.Item, sampling: SamplingParams) -> dict:
    times: list[float] = []
    t0 = time.perf_counter()
    alone = fork(lm, item.question, workers=1, sampling=sampling, on_token=lambda *_: times.append(time.perf_counter()))
    return _single(alone, times[0] - t0, times[-1] - t0)


def _vote(item: T.Item, f) -> dict:
    """The most common final answer among the workers (ties: the earliest worker's); the answer is the
    text of the first worker that gave it. Nothing is decoded, so its times are those of the count."""
    t0 = time.perf_counter()
    finals = [final_answer(item, b.text) for b in f.branches]
    counts = {a: finals.count(a) for a in finals}
    winner = max(finals, key=lambda a: (bool(a), counts[a]))  # an answer beats no answer; max keeps the first
    elapsed = time.perf_counter() - t0
    return {"answer": f.branches[finals.index(winner)].text, "ttft_s": elapsed, "latency_s": elapsed,
            "prefill_tokens": 0, "votes": counts[winner]}


def final_answer(item: T.Item, text: str) -> str:
    """The answer a text commits to, normalised for comparison: two syntheses agree when these match."""
    said = T.extract(item.task, text, choices=item.choices)
    return T.normalize_span(said) if T.task(item.task).kind == "span" else said.strip()


def read_predictions(path: Path) -> list[dict]:
    """Finished items of a predictions file, each id once: its latest record, which holds every method run
    on it (a record completed with more methods is appended). A last line cut short by a kill is ignored;
    any other unreadable line stops with its number."""
    latest = {}
    for row in read_records(path, check=_check_prediction):
        latest[row["id"]] = row  # a dict keeps each id where it first came
    return list(latest.values())


FIELDS = {"answer": str, "score": bool, "ttft_s": (int, float), "latency_s": (int, float), "prefill_tokens": int}


def _check_prediction(row: dict) -> None:
    kinds = {"id": str, "task": str, "methods": dict}
    if not all(isinstance(row.get(k), kind) for k, kind in kinds.items()):
        raise ValueError("not a prediction record; fix or remove it to resume")
    for method, result in row["methods"].items():
        result = result if isinstance(result, dict) else {}
        wrong = [k for k, kind in FIELDS.items() if not isinstance(result.get(k), kind)]
        if wrong:
            raise ValueError(f"method {method!r} lacks {', '.join(wrong)}; fix or remove the line to resume")


def _check_config(path: Path, config: EvalConfig) -> None:
    """Record the settings, or check them against those recorded: all but the methods and the limit must be
    the same (a rerun may add methods, the record listing every method run so far, and may raise the limit:
    the items of a larger limit extend those of a smaller one)."""
    budgets = {task: config.budget(task) for task in config.tasks}  # what the code's defaults resolve to
    mine = json.loads(json.dumps({**asdict(config), "budgets": budgets, "worker_seeds": ITEM_SEEDS}))
    if path.exists():
        have = read_json(path, "evaluation settings")
        if not isinstance(have, dict) or {**have, "methods": None, "limit": 0} != {**mine, "methods": None, "limit": 0}:
            raise ValueError(f"{path.parent} holds an evaluation with other settings; "
                             "use the same ones to resume or a new folder")
        if (mine["limit"] or math.inf) < (have["limit"] or math.inf):  # None: every item
            raise ValueError(f"{path.parent} holds an evaluation of {have['limit'] or 'all'} items per task; "
                             "resume it with that limit or a larger one")
        mine["methods"] = list(dict.fromkeys([*have.get("methods", []), *mine["methods"]]))
    write_json(path, mine)
