"""The recipe search for the cache route's synthesizer: train each candidate for the same number of
steps on the same self-distilled data, then score it with the fidelity gates (held-out KL, greedy
agreement with text synthesis, the retrieval probe) on both layouts. Resumable: finished candidates
are read back from the output JSON, unfinished runs continue from their checkpoints.

    python benchmarks/recipe_search.py --data runs/data/items.jsonl --runs runs/search --out results/search.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from parsyn import load
from parsyn.adapter import AdapterConfig
from parsyn.adapter import load as load_checkpoint
from parsyn.eval.fidelity import Variant, evaluate
from parsyn.mapper import MapperConfig
from parsyn.train.data import read_items
from parsyn.train.loop import TrainConfig, split, train
from parsyn.train.loss import LossConfig

KL = LossConfig(kl=1.0, ce=0.0, value_weight=5.0, right_weight=2.0)
CANDIDATES = {
    # the paper's recipe: cross-entropy on the teacher's tokens only, the 260-parameter affine mapper
    "paper-ce-affine": TrainConfig(loss=LossConfig(kl=0.0, ce=1.0, value_weight=1.0, right_weight=1.0),
                                   adapter=AdapterConfig(mapper=MapperConfig(kind="affine"))),
    # distillation on the teacher's distributions, value positions up-weighted
    "kl-affine": TrainConfig(loss=KL, adapter=AdapterConfig(mapper=MapperConfig(kind="affine"))),
    # + a branch-identity signal: per-branch key/value tags and per-channel calibration
    "kl-tagged": TrainConfig(loss=KL, adapter=AdapterConfig(mapper=MapperConfig(kind="tagged"))),
    # + a structural aid: the first 4 tokens of every branch recomputed at synthesis
    "kl-tagged-aid4": TrainConfig(loss=KL, adapter=AdapterConfig(mapper=MapperConfig(kind="tagged"), recompute=4)),
    # the LoRA alone, no mapper
    "kl-lora": TrainConfig(loss=KL, adapter=AdapterConfig()),
    # KL with a little cross-entropy
    "kl+ce-tagged": TrainConfig(loss=dataclasses.replace(KL, ce=0.1),
                                adapter=AdapterConfig(mapper=MapperConfig(kind="tagged"))),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m", help="model name or path (the packaged synthesizer's)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--held-out", type=int, default=40)
    parser.add_argument("--probe", type=int, default=100)
    parser.add_argument("--only", default="", help="comma-separated candidate names")
    args = parser.parse_args()
    lm = load(args.model)
    held = split(read_items(args.data), 4)[1][: args.held_out]
    results = json.loads(args.out.read_text()) if args.out.exists() else {"steps": args.steps, "candidates": {}}
    if "raw" not in results:
        results["raw"] = evaluate(lm, [Variant("raw parallel", "parallel"), Variant("raw sequential", "sequential")],
                                  held, probe_size=args.probe, progress=print)
        _write(args.out, results)
    names = [n for n in (args.only.split(",") if args.only else CANDIDATES) if n]
    for name in names:
        if name in results["candidates"]:
            continue
        config = dataclasses.replace(CANDIDATES[name], steps=args.steps, checkpoint_every=100)
        t0 = time.perf_counter()
        train(lm, args.data, args.runs / name, config)
        minutes = (time.perf_counter() - t0) / 60
        synthesizer = load_checkpoint(lm, args.runs / name / "checkpoint")
        rows = evaluate(lm, [Variant(f"{name} {layout}", layout, synthesizer) for layout in ("parallel", "sequential")],
                        held, probe_size=args.probe, progress=print)
        results["candidates"][name] = {"config": config.to_dict(), "train_minutes": minutes, "rows": rows[1:]}
        _write(args.out, results)
        print(json.dumps(rows[1:], indent=1))


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
