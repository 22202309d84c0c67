"""What the trained parts add to the cache route's time to first token on the default model: the
prompt prefill over a composed cache (`prepare`) raw, with the packaged checkpoint's mapper only, its
LoRA only, and both; plus one LoRA switch on and off. Medians of round-robin repeats.

    python benchmarks/trained_overhead.py --out results/trained_overhead.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from parsyn import adapter, bench, from_texts, load
from parsyn.synthesis import prepare

QUESTION = "Why is the sky blue? Answer briefly."
BRANCH = "The reason is that light scatters off small molecules, and blue light scatters the most. "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the JSON here as well")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument("--copies", type=int, default=5, help="sentences per branch")
    args = parser.parse_args()
    lm = load()
    trained = adapter.resolve(lm, "auto")
    if trained is None:
        raise SystemExit("error: no packaged checkpoint for the default model")
    f = from_texts(lm, QUESTION, [BRANCH * args.copies] * args.branches)
    variants = {
        "raw": None,
        "mapper only": dataclasses.replace(trained, config=dataclasses.replace(trained.config, lora=False)),
        "LoRA only": dataclasses.replace(trained, mapper=None),
        "mapper + LoRA": trained,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(2):  # warm-up
        for synthesizer in variants.values():
            prepare(lm, f, synthesizer=synthesizer)
    for _ in range(args.repeats):
        for name, synthesizer in variants.items():
            t0 = time.perf_counter()
            prepare(lm, f, synthesizer=synthesizer)
            times[name].append(time.perf_counter() - t0)
    switches = []
    for _ in range(args.repeats * 5):
        t0 = time.perf_counter()
        with adapter.lora_on(lm, trained):
            pass
        switches.append(time.perf_counter() - t0)
    report = {
        "environment": bench.environment(lm),
        "branch_tokens": [len(b.token_ids) for b in f.branches],
        "prepare_ms": {name: 1000 * statistics.median(xs) for name, xs in times.items()},
        "lora_switch_on_off_ms": 1000 * statistics.median(switches),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
