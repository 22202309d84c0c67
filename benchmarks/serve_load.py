"""Load on `parsyn serve` over loopback: many clients at once against the same requests one at a time.

- HTTP overhead: the client's time to the first streamed token of a cache-route synthesis on a stored
  fork, against the same synthesis submitted to the engine in-process, alternating (the median of the
  paired differences over --repeats); every client keeps one connection, as the openai client does;
- load: --clients clients, each sending --requests chat completions (--workers workers + cache synthesis,
  --tokens tokens each, streamed): every request must be answered or refused with 429, none lost or
  duplicated; p50/p99 TTFT (first synthesized token, as the client sees it) and end-to-end latency;
- throughput: the same kind of requests one at a time (--sequential of them), requests per second;
  the clients of both run in a process of their own, as a real server's clients do;
- fork cache: clients storing --forks forks past a --cache-mib budget; its bytes and the process's memory.

Bounded: stops after --time-limit seconds (the report says so).

    python benchmarks/serve_load.py --model smollm2-135m --out results/serve_load.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import psutil

from parsyn import load, synthesize
from parsyn.adapter import resolve
from parsyn.eval import bench
from parsyn.sampling import SamplingParams
from parsyn.serve import jobs
from parsyn.serve.api import create_app
from parsyn.serve.engine import Engine
from parsyn.serve.forks import ForkStore
from parsyn.serve.local import LocalServer

QUESTION = "When and where is the team meeting, and what should people bring?"
NOTES = ["Your note says: the team meeting is on Thursday at 10:00.",
         "Your note says: the meeting takes place in room 204.",
         "Your note says: everyone should bring their laptop."]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def one_request(client: httpx.Client, url: str, i: int, args, deadline: float) -> dict:
    """One streamed workflow request on `client` (a client keeps its connection, as the openai client does);
    its status, client TTFT and end-to-end time."""
    body = {"messages": [{"role": "user", "content": f"{QUESTION} (request {i})"}], "max_tokens": args.tokens,
            "temperature": 0, "seed": i, "stream": True, "user": f"r{i}",
            "parsyn": {"workers": args.workers, "roles": NOTES[: args.workers] if args.workers <= 3 else None,
                       "route": "cache", "worker_max_tokens": args.tokens}}
    t0 = time.perf_counter()
    first, text, done = None, [], False
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body,
                           timeout=max(1.0, deadline - time.monotonic())) as r:
            if r.status_code != 200:
                r.read()
                return {"id": i, "status": r.status_code}
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                for c in chunk.get("choices", []):
                    if c["delta"].get("content"):
                        first = first or time.perf_counter()
                        text.append(c["delta"]["content"])
    except httpx.TransportError as e:
        return {"id": i, "status": f"transport error: {type(e).__name__}"}
    end = time.perf_counter()
    return {"id": i, "status": 200 if done else "cut short", "ttft_s": (first or end) - t0, "e2e_s": end - t0,
            "chars": len("".join(text))}


def engine_ttft(engine: Engine, job) -> float:
    """Submit `job` to the engine in-process; the time to its first token event."""
    times, done = [], threading.Event()

    def sink(event: tuple) -> None:
        if event[0] == "token":
            times.append(event[3])
        elif event[0] in ("done", "error"):
            done.set()

    t0 = time.perf_counter()
    engine.submit(job, sink)
    done.wait(60)
    return times[0] - t0


def http_overhead(url: str, lm, engine: Engine, store: ForkStore, synthesizer, repeats: int) -> dict:
    """Time to the first token of the same cache-route synthesis on the same stored fork: called directly
    on this thread, submitted to the engine in-process, and over HTTP (streamed). HTTP's share is the
    last against the second: both run on the engine thread (a direct call between them would leave its
    own OpenMP threads spinning against the engine's)."""
    client = httpx.Client(timeout=60)
    fork_id = client.post(url + "/v1/forks", json={"question": QUESTION, "branches": NOTES}).json()["id"]
    fork, sampling = store.get(fork_id), SamplingParams(1)
    direct = [synthesize(lm, fork, route="cache", synthesizer=synthesizer, sampling=sampling).ttft_s
              for _ in range(repeats)]
    time.sleep(1.0)
    in_engine, over_http = [], []
    for _ in range(repeats):
        in_engine.append(engine_ttft(engine, jobs.synthesize(lm, fork, ["cache"], sampling=sampling,
                                                             synthesizer=synthesizer)))
        t0, seen = time.perf_counter(), None
        with client.stream("POST", f"{url}/v1/forks/{fork_id}/synthesize", json={"max_tokens": 1, "stream": True}) as r:
            for line in r.iter_lines():
                if seen is None and line.startswith("data: ") and "fork.synthesis.chunk" in line:
                    seen = time.perf_counter() - t0
        over_http.append(seen)
    client.close()
    d, e, h = (statistics.median(x) for x in (direct, in_engine, over_http))
    paired = statistics.median(b - a for a, b in zip(in_engine, over_http))
    return {"repeats": repeats, "direct_ttft_median_s": d, "engine_ttft_median_s": e, "http_ttft_median_s": h,
            "added_ms": 1000 * paired, "added_ms_of_medians": 1000 * (h - e), "engine_vs_direct_ms": 1000 * (e - d)}


def run_clients(url: str, plan: list[list[int]], args, seconds: float) -> tuple[list[dict], float]:
    """One thread per client, client c sending the requests plan[c] one after another; their results and the
    wall time. Run in a process of its own (`elsewhere`): clients of a real server do not share its
    interpreter, and in-process client threads would take the engine's turns at the interpreter lock."""
    deadline = time.monotonic() + seconds
    lock, results = threading.Lock(), []

    def client(ids: list[int]) -> None:
        with httpx.Client() as http:
            for i in ids:
                if time.monotonic() > deadline:
                    return
                r = one_request(http, url, i, args, deadline)
                with lock:
                    results.append(r)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(plan)) as pool:
        list(pool.map(client, plan))
    return results, time.perf_counter() - t0


def elsewhere(fn, *arguments):
    """fn(*arguments) in a fresh process (spawned: nothing of the server's state goes with it)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *arguments).result()


def load_phase(url: str, args, deadline: float) -> dict:
    ids = list(range(args.clients * args.requests))
    plan = [ids[c * args.requests:(c + 1) * args.requests] for c in range(args.clients)]
    results, wall = elsewhere(run_clients, url, plan, args, deadline - time.monotonic())
    return summarize(results, ids, wall)


def summarize(results: list[dict], ids: list[int], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    seen = [r["id"] for r in results]
    return {"sent": len(results), "planned": len(ids), "answered": len(ok),
            "refused_429": sum(r["status"] == 429 for r in results),
            "other": [r for r in results if r["status"] not in (200, 429)],
            "duplicated": len(seen) - len(set(seen)), "wall_s": wall,
            "requests_per_s": len(ok) / wall if wall else None,
            "ttft_p50_s": percentile([r["ttft_s"] for r in ok], 0.5),
            "ttft_p99_s": percentile([r["ttft_s"] for r in ok], 0.99),
            "e2e_p50_s": percentile([r["e2e_s"] for r in ok], 0.5),
            "e2e_p99_s": percentile([r["e2e_s"] for r in ok], 0.99)}


def fork_phase(url: str, store: ForkStore, args, deadline: float) -> dict:
    """Clients storing forks (and synthesizing on them) past the fork cache's budget: the bytes it holds,
    sampled throughout, stay within the budget; the process's resident memory is sampled alongside."""
    process, peak, stop = psutil.Process(), {"store": 0, "rss": 0}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["store"] = max(peak["store"], store.bytes)
            peak["rss"] = max(peak["rss"], process.memory_info().rss)
            time.sleep(0.01)

    def client(c: int) -> int:
        kept = 0
        with httpx.Client(timeout=300) as http:
            for i in range(args.forks // args.clients):
                if time.monotonic() > deadline:
                    break
                texts = [f"{note} (client {c}, fork {i}) " + "More detail. " * 40 for note in NOTES]
                fork = http.post(url + "/v1/forks", json={"question": QUESTION, "branches": texts}).json()
                r = http.post(f"{url}/v1/forks/{fork['id']}/synthesize", json={"max_tokens": 4})
                kept += r.status_code == 200
        return kept

    rss0 = process.memory_info().rss
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(args.clients) as pool:
        synthesized = sum(pool.map(client, range(args.clients)))
    stop.set()
    watcher.join()
    return {"forks": args.forks // args.clients * args.clients, "synthesized": synthesized,
            "budget_bytes": store.budget, "peak_store_bytes": peak["store"], "evictions": store.evictions,
            "within_budget": peak["store"] <= store.budget, "rss_start_bytes": rss0, "rss_peak_bytes": peak["rss"]}


def sequential_phase(url: str, args, deadline: float) -> dict:
    base = args.clients * args.requests  # other seeds than the load phase's, the same kind of request
    ids = list(range(base, base + args.sequential))
    results, wall = elsewhere(run_clients, url, [ids], args, deadline - time.monotonic())
    return summarize(results, ids, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model name or path (default: the default model)")
    parser.add_argument("--adapter", default="auto")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="worker and answer tokens")
    parser.add_argument("--sequential", type=int, default=8, help="requests run one at a time for the baseline")
    parser.add_argument("--repeats", type=int, default=20, help="HTTP overhead repeats")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--forks", type=int, default=256, help="forks stored in the fork-cache phase")
    parser.add_argument("--cache-mib", type=float, default=64, help="the fork cache's budget in that phase")
    parser.add_argument("--time-limit", type=float, default=3600.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit
    lm = load(args.model)
    trained = resolve(lm, args.adapter)
    engine = Engine(lm, trained, max_queue=args.max_queue).start()
    store = ForkStore(int(args.cache_mib * 2**20))
    app = create_app(lm, model_name=lm.name, synthesizer=trained, engine=engine, store=store)
    with LocalServer(app) as url:
        report = {"environment": bench.environment(lm), "config": vars(args) | {"out": str(args.out)},
                  "http": http_overhead(url, lm, engine, store, trained, args.repeats)}
        print(f"HTTP adds {report['http']['added_ms']:.1f} ms to the cache-route TTFT", file=sys.stderr)
        report["sequential"] = sequential_phase(url, args, deadline)
        print(f"one at a time: {report['sequential']['requests_per_s']:.3f} requests/s", file=sys.stderr)
        report["load"] = load_phase(url, args, deadline)
        report["fork_cache"] = fork_phase(url, store, args, deadline)
    engine.stop()
    load_, seq = report["load"], report["sequential"]
    report["throughput_gain"] = (load_["requests_per_s"] / seq["requests_per_s"]
                                 if load_["requests_per_s"] and seq["requests_per_s"] else None)
    report["stopped_by_time_limit"] = time.monotonic() > deadline
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    f = report["fork_cache"]
    print(f"fork cache: peak {f['peak_store_bytes'] / 2**20:.1f} MiB of a {f['budget_bytes'] / 2**20:.0f} MiB budget "
          f"({f['evictions']} evictions); resident memory {f['rss_start_bytes'] / 2**30:.2f} -> "
          f"{f['rss_peak_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    print(f"\n{load_['answered']} of {load_['planned']} answered, {load_['refused_429']} refused (429), "
          f"{load_['duplicated']} duplicated, {len(load_['other'])} other; TTFT p50 {load_['ttft_p50_s']:.2f} s "
          f"p99 {load_['ttft_p99_s']:.2f} s; e2e p50 {load_['e2e_p50_s']:.2f} s p99 {load_['e2e_p99_s']:.2f} s; "
          f"{report['throughput_gain']:.1f}x the throughput of one at a time", file=sys.stderr)


if __name__ == "__main__":
    main()
