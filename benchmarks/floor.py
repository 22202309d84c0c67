"""Where the cache route's floor goes: the synthesizer's prompt prefilled over a composed cache (the floor)
against the same prompt with no context (bare). Their gap is what reading the composed cache costs; this
splits it by operator (torch.profiler, self CPU time, summed over repeats) and sets the attention part
beside its arithmetic (the FLOPs of q·kᵀ and p·v over the cached keys at the matmul rate this machine
reaches on the same shapes).

    python benchmarks/floor.py --branches 3 --length 512 --out results/floor.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from parsyn import load
from parsyn.compose import compose
from parsyn.eval.bench import branch_text, environment, round_robin
from parsyn.files import write_json
from parsyn.forward import State, attention_mask, prefill_rows
from parsyn.rope import rope_of
from parsyn.synthesis import prefill_over, prompt_tokens
from parsyn.workers import from_texts

GROUPS = {  # operator name -> what it is part of
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (SDPA kernel)",
    "aten::_scaled_dot_product_attention_math": "attention (SDPA kernel)",
    "aten::cat": "cache copies (cat)",
    "aten::copy_": "copies (copy_)",
    "aten::masked_fill": "mask construction",
    "aten::masked_fill_": "mask construction",
    "aten::le": "mask construction",
    "aten::ge": "mask construction",
    "aten::bitwise_and": "mask construction",
    "aten::bitwise_not": "mask construction",
    "aten::zeros": "mask construction",
}


def by_group(events) -> dict[str, float]:
    """Self CPU ms per group (unlisted operators under their own name)."""
    out = defaultdict(float)
    for e in events:
        if e.key.startswith("aten::") or e.key.startswith("mkldnn"):
            out[GROUPS.get(e.key, e.key)] += e.self_cpu_time_total / 1000
    return dict(out)


def attention_arithmetic(lm, keys: int, queries: int) -> dict:
    """FLOPs of the prompt's attention over `keys` keys in every layer, and the time they take at the rate
    a plain batched matmul of the same shapes runs here."""
    c = lm.model.config
    heads, d, layers = c.num_attention_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, \
        c.num_hidden_layers
    flops = 2 * 2 * heads * queries * keys * d * layers  # q·kᵀ and p·v, a multiply-add each
    q, k = torch.randn(heads, queries, d), torch.randn(heads, d, keys)
    for _ in range(3):
        q @ k
    runs = []
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(layers):
            (q @ k)
        runs.append(time.perf_counter() - t0)
    rate = 2 * heads * queries * keys * d * layers / statistics.median(runs)
    return {"flops": flops, "matmul_flops_per_s": rate, "at_matmul_rate_ms": 1000 * flops / rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="model name or path (default: the default model)")
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--layout", default="parallel")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    lm = load(args.model)
    f = from_texts(lm, "Summarize the findings of the workers.", [branch_text(lm, args.length)] * args.branches)
    prompt = prompt_tokens(lm, f)
    composed = compose(f.prefix, [b.kv for b in f.branches], rope_of(lm.model), layout=args.layout)
    start = composed.next_position
    key_pos = torch.cat([composed.positions[None], torch.arange(start, start + len(prompt))[None]], 1)
    query_pos = torch.arange(start, start + len(prompt))[None]

    def timed(work):
        def run() -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                work()
            return time.perf_counter() - t0
        return run

    parts = {
        "floor": lambda: prefill_over(lm, composed, prompt),
        "bare": lambda: prefill_rows(lm, [prompt]),
        "state": lambda: State.over(composed.segments, composed.positions[None]),
        "mask": lambda: attention_mask(key_pos, query_pos, lm.windows, lm.dtype),
    }
    for work in parts.values():
        timed(work)()
    times = round_robin({k: timed(w) for k, w in parts.items()}, args.repeats)
    medians = {k: 1000 * statistics.median(v) for k, v in times.items()}
    profiles = {}
    for name in ("floor", "bare"):
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats):
                parts[name]()
        profiles[name] = {k: v / args.repeats for k, v in by_group(prof.key_averages()).items()}
    gap = {k: profiles["floor"].get(k, 0.0) - profiles["bare"].get(k, 0.0)
           for k in set(profiles["floor"]) | set(profiles["bare"])}
    gap = dict(sorted(((k, v) for k, v in gap.items() if abs(v) >= 0.05), key=lambda kv: -abs(kv[1])))
    result = {"environment": environment(lm), "config": {**vars(args), "out": str(args.out)},
              "cached_keys": composed.positions.numel(), "prompt_tokens": len(prompt), "median_ms": medians,
              "gap_ms": medians["floor"] - medians["bare"], "gap_by_operator_ms": gap,
              "profiles_ms": profiles,
              "attention_arithmetic": attention_arithmetic(lm, composed.positions.numel() + len(prompt), len(prompt))}
    write_json(args.out, result)
    print(f"floor {medians['floor']:.1f} ms, bare prompt {medians['bare']:.1f} ms: gap {result['gap_ms']:.1f} ms "
          f"over {result['cached_keys']} cached keys; state {medians['state']:.1f} ms, mask {medians['mask']:.1f} ms")
    for k, v in list(gap.items())[:10]:
        print(f"  {k:<50} {v:+7.2f} ms")
    a = result["attention_arithmetic"]
    print(f"attention arithmetic: {a['flops'] / 1e9:.2f} GFLOP, {a['at_matmul_rate_ms']:.1f} ms at "
          f"{a['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
