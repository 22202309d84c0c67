"""Workers fanned out over Ray actors against the same workers in one local batch: wall time of the fork,
bytes shipped through the object store, and the synthesis's time to first token; beside them the
object-store transfer rate and the per-token K/V cost model that docs/scale.md reads.

Variants, each on the same question, workers and seeds (every Ray variant's branch token ids are checked
equal to the local fork's):
- `local`: every worker in one batch in this process (`parsyn.fork`);
- `ray_ship_kv`: the driver prefills the prefix once and ships it; actors return each branch's K/V;
- `ray_recompute_prefix`: the actors prefill the prefix themselves; branches' K/V return;
- `ray_ids_reprefill`: actors return token ids only and the driver prefills every branch after the prefix
  before synthesizing (the "re-prefill the branch text at the synthesizer" side of the trade-off).

Medians of `--repeats` timed runs after one warm-up (which also starts the actors). `--address local`
starts a throwaway two-node cluster (one actor per node) and ends it; give HOST:PORT for a running one.

    python benchmarks/ray_fanout.py --model smollm2-135m --workers 8 --actors 2 --out results/ray_fanout.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

from parsyn import load
from parsyn.dist import RayExecutor
from parsyn.dist.executor import transfer_rate
from parsyn.eval.bench import environment, round_robin
from parsyn.files import read_json, write_json
from parsyn.sampling import SamplingParams
from parsyn.synthesis import synthesize
from parsyn.workers import fork, from_ids

QUESTION = "Plan a three-day trip to Lisbon for a family with two children. Give a day-by-day outline."
ROLES = ("Focus on museums.", "Focus on food.", "Focus on parks and beaches.", "Focus on transport.",
         "Focus on the budget.", "Focus on rainy-day options.", "Focus on evenings.", "Focus on day trips.")
# K/V shapes on paper: (layers, kv heads, head dim, parameters in billions), from each model's config.json
SHAPES = {
    "SmolLM2-135M": (30, 3, 64, 0.135),
    "Qwen2.5-Coder-0.5B (parsyn's default)": (24, 2, 64, 0.49),
    "Qwen2.5-7B": (28, 4, 128, 7.6),
    "Llama-3.1-8B": (32, 8, 128, 8.0),
    "Qwen3-14B": (40, 8, 128, 14.8),
    "Llama-3.1-70B": (80, 8, 128, 70.6),
}
DTYPES = {"fp32": 4, "bf16": 2, "int8": 1}
H200_RESULTS = Path(__file__).resolve().parent.parent / "results" / "bench-qwen3-14b.json"


def timed(call) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def variant(lm, executor, roles, sampling, repeats: int, reference) -> tuple[dict, object]:
    """Median wall time of the fork and what it shipped (tokens checked against the local fork)."""
    runs = []
    for _ in range(repeats + 1):  # the first is a warm-up (it starts the actors)
        wall_s, f = timed(lambda: fork(lm, QUESTION, workers=len(roles), roles=roles, sampling=sampling,
                                       executor=executor))
        if reference is not None and [b.token_ids for b in f.branches] != [b.token_ids for b in reference.branches]:
            raise SystemExit("a Ray fork differs from the local fork: the comparison would be void")
        runs.append({"wall_s": wall_s, **(_shipped(executor.last) if executor is not None else {})})
    out = {k: statistics.median(r[k] for r in runs[1:]) for k in runs[1]}
    return {**out, "warmup_wall_s": runs[0]["wall_s"], "branch_tokens": sum(len(b.token_ids) for b in f.branches)}, f


def ttfts(lm, forks: dict, repeats: int) -> dict[str, float]:
    """Median cache-route TTFT on each variant's fork, the variants taken in turn (round-robin), so a busy
    spell of the machine falls on all of them alike."""
    timers = {name: (lambda f=f: synthesize(lm, f, route="cache", sampling=SamplingParams(2)).ttft_s)
              for name, f in forks.items()}
    return {name: statistics.median(t) for name, t in round_robin(timers, repeats).items()}


def _shipped(s) -> dict:
    return {"bytes_shipped": s.bytes_shipped, "prefix_bytes": s.prefix_bytes, "prefix_read_bytes": s.prefix_reads,
            "branch_kv_bytes": s.branch_bytes, "remote_s": s.remote_s}


def transfers(executor, sizes_mib=(8, 32, 128)) -> list[dict]:
    """Object-store rate from each actor into the driver (the actor on the driver's node, and on the other)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    out = []
    for actor in executor.pool.actors:
        for mib in sizes_mib:
            rates = [transfer_rate(actor, mib * 2**20) for _ in range(3)]
            out.append({"bytes": mib * 2**20, "same_node_as_driver": executor.pool.nodes[actor] == here,
                        "rate_bytes_per_s": statistics.median(rates)})
    return out


def reprefill(lm, f, repeats: int) -> dict:
    """The driver's prefill of the prefix and every branch after it (what the synthesizer would do with
    branch texts instead of their K/V): seconds and branch tokens per second, median of `repeats`."""
    ids = [b.token_ids for b in f.branches]
    seconds = statistics.median(timed(lambda: from_ids(lm, f.question, f.prefix_ids, ids))[0]
                                for _ in range(repeats))
    tokens = sum(map(len, ids))
    return {"seconds": seconds, "branch_tokens": tokens, "tokens_per_s": tokens / seconds}


def h200_prefill_rate() -> dict:
    """Branch tokens per second the H200 prefilled on the text route (Qwen3-14B shape, bf16): the largest
    cell's (text TTFT - floor) over its branch tokens."""
    cells = [c for c in read_json(H200_RESULTS, "the GPU sweep")["cells"] if not c.get("skipped")]
    big = max(cells, key=lambda c: sum(c["branch_tokens"]))
    tokens = sum(big["branch_tokens"])
    return {"model": "Qwen3-14B shape, bf16, one H200", "cell": f"{big['branches']} x {big['length']}",
            "tokens_per_s": tokens / (big["text_ttft_s"] - big["floor_s"])}


def cost_model(rate_14b: float, lm, cpu_rate: float) -> list[dict]:
    """Bytes of K/V per branch token by shape and dtype; the link bandwidth above which shipping K/V beats
    re-prefilling the branch at the synthesizer (bytes/token x prefill tokens/s). GPU prefill rates other
    than Qwen3-14B's are scaled by parameter count from it (an assumption: prefill is compute-bound), for
    7B and larger only: below that a GPU's prefill is bound by kernel launches and no rate is given."""
    rows = []
    for name, (layers, heads, dim, params) in SHAPES.items():
        rate = rate_14b * SHAPES["Qwen3-14B"][3] / params if params >= 7 else None
        for dtype, size in DTYPES.items():
            per_token = 2 * layers * heads * dim * size
            rows.append({"model": name, "dtype": dtype, "kv_bytes_per_token": per_token,
                         "prefill_tokens_per_s": rate, "where": "H200 (Qwen3-14B measured, others scaled)",
                         "break_even_bytes_per_s": per_token * rate if rate else None})
    rows.append({"model": lm.name, "dtype": str(lm.dtype).removeprefix("torch."),
                 "kv_bytes_per_token": lm.kv_bytes_per_token, "prefill_tokens_per_s": cpu_rate,
                 "where": "this CPU (measured)", "break_even_bytes_per_s": lm.kv_bytes_per_token * cpu_rate})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--address", default="local", help="local (a throwaway two-node cluster), auto or HOST:PORT")
    p.add_argument("--workers", type=int, default=8, choices=range(1, len(ROLES) + 1), help="one role each")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--tokens", type=int, default=48, help="each worker's token budget")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--note", default="", help="conditions of the run (e.g. another job loaded the machine)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    lm, roles = load(args.model), ROLES[: args.workers]
    sampling = SamplingParams(args.tokens, 0.7, 0.95, 0)
    results, forks = {}, {}
    results["local"], reference = variant(lm, None, roles, sampling, args.repeats, None)
    forks["local"] = reference
    with RayExecutor(args.address, actors=args.actors, model=args.model, timeout_s=1800) as ex:
        base = ex.options
        for name, options in [("ray_ship_kv", {}), ("ray_recompute_prefix", {"prefix": "recompute"}),
                              ("ray_ids_reprefill", {"returns": "ids"})]:
            ex.options = dataclasses.replace(base, **options)
            results[name], forks[name] = variant(lm, ex, roles, sampling, args.repeats, reference)
            print(name, results[name], file=sys.stderr, flush=True)
        rates = transfers(ex)
    for name, ttft_s in ttfts(lm, forks, 3 * args.repeats).items():  # the synthesis: the same on every fork
        results[name] |= {"ttft_s": ttft_s, "e2e_first_token_s": results[name]["wall_s"] + ttft_s}
    driver = reprefill(lm, reference, args.repeats)
    h200 = h200_prefill_rate()
    write_json(args.out, {
        "command": "python " + " ".join(sys.argv),
        "config": {**vars(args), "out": str(args.out), "question": QUESTION, "roles": list(roles),
                   "sampling": dataclasses.asdict(sampling)},
        "environment": environment(lm),
        "versions": {"ray": metadata.version("ray"), "parsyn": metadata.version("parsyn")},
        "results": results, "transfer": rates, "prefix_prefill_s": reference.prefill_s, "driver_reprefill": driver,
        "h200": h200, "cost_model": cost_model(h200["tokens_per_s"], lm, driver["tokens_per_s"])})
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
