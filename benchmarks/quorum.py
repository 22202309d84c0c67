"""End-to-end latency — question to first synthesized token, workers included — for the text and cache
routes, waiting for every worker or for a quorum, with accuracy beside it, on evaluation tasks.

Per item the workers run once, as one batch, each worker's finish time taken from its last token. A
quorum join of k holds exactly the first k finished branches, and any that finish at the same step:
`fork(..., quorum=k)` cuts the rest, and the rows it keeps decode as in the full batch
(tests/test_workers.py checks it). So the quorum's workers time is the k-th finish, and its synthesis
reads those branches. Every variant is scored on the same items.
Records go to OUT.jsonl as items finish (a rerun resumes); the summary goes to OUT.

    python benchmarks/quorum.py --tasks mmlu,boolq,facts --limit 10 --out results/quorum.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from parsyn import adapter, load
from parsyn.eval import stats as S
from parsyn.eval import tasks as T
from parsyn.eval.bench import environment
from parsyn.eval.run import BUDGETS, worker_roles
from parsyn.files import Records, read_records, write_json
from parsyn.sampling import SamplingParams
from parsyn.synthesis import synthesize
from parsyn.workers import fork


def item_record(lm, trained, item: T.Item, workers: int, quorum: int, seed: int) -> dict:
    worker_tokens, answer_tokens = BUDGETS[T.task(item.task).kind]
    last: dict[int, float] = {}
    roles = worker_roles(item, workers)  # an evidence task has a worker per part
    workers = len(roles)
    t0 = time.perf_counter()
    f = fork(lm, item.question, workers=workers, roles=roles,
             sampling=SamplingParams(worker_tokens, 0.7, 0.95, seed),
             on_token=lambda w, _: last.__setitem__(w, time.perf_counter() - t0))
    full_s = time.perf_counter() - t0
    steps = [b.generated for b in f.branches]  # workers decode in lockstep: a worker's finish step
    first = [w for w in range(workers) if steps[w] <= sorted(steps)[quorum - 1]]  # what fork(quorum=k) keeps
    kept = dataclasses.replace(f, branches=tuple(f.branches[w] for w in first))
    sampling = SamplingParams(answer_tokens, 0.0)
    out = {"id": item.id, "task": item.task, "finish_s": [last[w] for w in range(workers)], "variants": {}}
    for join, g, workers_s in (("all", f, full_s), (f"quorum {quorum}", kept, max(last[w] for w in first))):
        for route in ("text", "cache"):
            s = synthesize(lm, g, route=route, sampling=sampling, synthesizer=trained if route == "cache" else None)
            out["variants"][f"{route}, {join}"] = {"score": T.score(item, s.answer), "workers_s": workers_s,
                                                   "ttft_s": s.ttft_s, "e2e_s": workers_s + s.ttft_s}
    return out


def summary(records: list[dict], config: dict, lm) -> dict:
    names = list(records[0]["variants"])
    text_all = [r["variants"]["text, all"]["score"] for r in records]
    rows = []
    for name in names:
        got = [r["variants"][name] for r in records]
        e2e = [g["e2e_s"] for g in got]
        rows.append({"variant": name, **S.accuracy([g["score"] for g in got]),
                     "vs_text_all": S.paired([g["score"] for g in got], text_all),
                     "e2e_median_s": statistics.median(e2e), "e2e_mean_s": statistics.fmean(e2e),
                     "workers_median_s": statistics.median(g["workers_s"] for g in got),
                     "ttft_median_s": statistics.median(g["ttft_s"] for g in got)})
    return {"environment": environment(lm), "config": config, "n": len(records), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="summary JSON (records beside it, .jsonl)")
    parser.add_argument("--model", help="model name or path (default: the default model)")
    parser.add_argument("--tasks", default="mmlu,boolq,facts")
    parser.add_argument("--limit", type=int, default=10, help="items per task")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--quorum", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.quorum <= args.workers:
        raise SystemExit(f"error: --quorum must be between 1 and --workers ({args.workers}), got {args.quorum}")
    tasks = args.tasks.split(",")
    lm = load(args.model)
    trained = adapter.resolve(lm, "auto")
    items = [i for t in tasks for i in T.load(t, limit=args.limit, seed=args.seed, parts=args.workers)]
    path = args.out.with_suffix(".jsonl")
    done = {r["id"] for r in read_records(path)} if path.exists() else set()
    with Records(path) as records:
        for n, item in enumerate(items, 1):
            if item.id not in done:
                records.append(item_record(lm, trained, item, args.workers, args.quorum, args.seed))
            print(f"\r{n}/{len(items)} items", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ids = {i.id for i in items}
    mine = [r for r in read_records(path) if r["id"] in ids]
    config = {**vars(args), "out": str(args.out), "synthesizer": trained is not None}
    result = summary(mine, config, lm)
    write_json(args.out, result)
    for row in result["rows"]:
        d = row["vs_text_all"]
        print(f"{row['variant']:>18}  n={row['n']}  accuracy {100 * row['accuracy']:5.1f}%  "
              f"vs text-all {100 * d['diff']:+5.1f} pts  regressions {d['regressions']}  "
              f"e2e median {row['e2e_median_s']:.2f} s (workers {row['workers_median_s']:.2f} s, "
              f"TTFT {row['ttft_median_s']:.2f} s)")


if __name__ == "__main__":
    main()
