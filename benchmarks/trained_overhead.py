"""What the trained parts add to the cache route's time to first token on the default model: the
prompt prefill over a composed cache (`prepare`) raw, with the packaged checkpoint's mapper only, its
LoRA only, and both; plus entering and leaving the LoRA's active context once. Medians of round-robin
repeats.

    python benchmarks/trained_overhead.py --out results/trained_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from parsyn import adapter, from_texts, load
from parsyn.eval import bench
from parsyn.eval.fidelity import ablations
from parsyn.synthesis import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the JSON here as well")
    parser.add_argument("--model", default="smollm2-135m", help="model name or path (the packaged synthesizer's)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument("--length", type=int, default=100, help="tokens per branch")
    args = parser.parse_args()
    lm = load(args.model)
    trained = adapter.resolve(lm, "auto")
    if trained is None:
        raise SystemExit("error: no packaged checkpoint for the default model")
    f = from_texts(lm, "Summarize the findings of the workers.", [bench.branch_text(lm, args.length)] * args.branches)

    def timer(synthesizer):
        def run() -> float:
            t0 = time.perf_counter()
            prepare(lm, f, synthesizer=synthesizer)
            return time.perf_counter() - t0
        return run

    def switch() -> float:
        t0 = time.perf_counter()
        with trained.active():
            pass
        return time.perf_counter() - t0

    timers = {v.name: timer(v.synthesizer) for v in ablations(trained, ["parallel"])}
    times = bench.round_robin({**timers, "LoRA active context, in and out": switch}, args.repeats)
    report = {
        "environment": bench.environment(lm),
        "branch_tokens": [len(b.token_ids) for b in f.branches],
        "median_ms": {name: 1000 * statistics.median(xs) for name, xs in times.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
