"""The core runtime's performance figures on the default model:

- time to first token, text route against cache route, 3 branches of ~512 tokens, ~30-token prompt;
- the cache route's composition overhead above its floor (prompt prefill over a ready cache);
- batched workers against the same workers one after another.

    python benchmarks/core.py --out results/core.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from parsyn import load
from parsyn.eval import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the JSON here as well")
    parser.add_argument("--model", help="a model name or path (default: the default model)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--branches", type=int, default=3)
    args = parser.parse_args()
    lm = load(args.model)
    report = {
        "environment": bench.environment(lm),
        "ttft": bench.ttft_cell(lm, args.branches, args.length, repeats=args.repeats),
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


if __name__ == "__main__":
    main()
