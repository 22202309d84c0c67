"""The core runtime's performance figures on the default model:

- time to first token, text route against cache route, 3 branches of ~512 tokens, ~30-token prompt:
  the raw route and the default one (the packaged synthesizer, when one fits the model);
- the cache route's composition overhead above its floor (prompt prefill over a ready cache), and the
  floor against the same prompt prefilled with no context;
- batched workers against the same workers one after another.

    python benchmarks/core.py --out results/core.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from parsyn import adapter, load
from parsyn.eval import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the JSON here as well")
    parser.add_argument("--model", help="a model name or path (default: the default model)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument("--adapter", default="auto", help="synthesizer for the default route: auto, none or a path")
    args = parser.parse_args()
    lm = load(args.model)
    trained = adapter.resolve(lm, args.adapter)
    report = {
        "environment": bench.environment(lm),
        "synthesizer": trained.path.name if trained is not None and trained.path else None,
        "ttft": bench.ttft_cell(lm, args.branches, args.length, repeats=args.repeats, synthesizer=trained),
        "workers": bench.worker_speed(lm, workers=3, max_new_tokens=64, repeats=2),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    t, w = report["ttft"], report["workers"]
    print(
        f"\nTTFT text {t['text_ttft_s']:.3f} s, cache {t['cache_ttft_s']:.3f} s: {t['speedup']:.1f}x; "
        f"floor {t['floor_s']:.3f} s, overhead {100 * t['overhead']:.1f}% above the floor "
        f"({100 * t['overhead_share_of_cache_ttft']:.1f}% of the cache TTFT); "
        f"batched workers {w['speedup']:.2f}x faster than one by one",
        file=sys.stderr,
    )
    if "trained_ttft_s" in t:
        print(f"default route (trained): {t['trained_ttft_s']:.3f} s, {t['trained_speedup']:.1f}x lower than text, "
              f"{100 * t['trained_overhead_vs_raw']:+.1f}% above the raw route", file=sys.stderr)


if __name__ == "__main__":
    main()
