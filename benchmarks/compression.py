"""Branch-KV compression before synthesis: what keeping fewer branch tokens (SnapKV-style) and int8 K/V
cost in answers and buy in TTFT and memory, on long evidence branches.

Each item is a SQuAD question (evaluation positions) whose passage hides in one of three branches, each
branch `--branch-tokens` long: passages of other articles with the gold one at a random place, as a
research worker's reading would hand them over. Per item the fork is built once (`from_texts`); the text
route and the default cache route (the packaged synthesizer when one fits) answer it, then the cache route
again under every compression. Per variant: the answer's score, agreement with the uncompressed cache
route's answer, the first-token KL divergence from it (full vocabulary), TTFT with compression inline (the
fork compressed inside the call) and with the fork compressed beforehand (a fork synthesized many times
is compressed once: the prompt's prefill over the compressed fork, to its first token's logits), the
compression's own time, and the branch K/V's stored bytes.

Records go to OUT.jsonl as items finish (a rerun resumes); the summary to OUT, the plot to OUT.png.

    python benchmarks/compression.py --limit 40 --branch-tokens 1024 --out results/compression.json
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from parsyn import adapter, load
from parsyn import datasets as D
from parsyn.compress import compress, kv_nbytes, stored_bytes
from parsyn.eval import stats as S
from parsyn.eval import tasks as T
from parsyn.eval.bench import environment
from parsyn.files import Records, read_records, write_json
from parsyn.sampling import SamplingParams
from parsyn.scoring import contains_answer
from parsyn.synthesis import finish, prepare, prompt_tokens, settings
from parsyn.workers import from_texts

VARIANTS = {  # name -> (keep, ranked by, kv_bits)
    "keep 0.5": (0.5, "prompt", None),
    "keep 0.25": (0.25, "prompt", None),
    "keep 0.1": (0.1, "prompt", None),
    "keep 0.25, by tail": (0.25, "tail", None),
    "int8": (1.0, "prompt", 8),
    "keep 0.25 + int8": (0.25, "prompt", 8),
}
ASK = "{question}\nAnswer with a short phrase."


def items(lm, limit: int, branch_tokens: int, branches: int, seed: int) -> list[dict]:
    """The benchmark's items: question, gold answers, branch texts (the gold passage in one of them)."""
    rows = D.squad("eval")
    rng = random.Random(seed)
    order = rng.sample(range(len(rows)), len(rows))
    size = {}

    def tokens(text: str) -> int:
        if text not in size:
            size[text] = len(lm.tokenizer.encode(text, add_special_tokens=False))
        return size[text]

    out = []
    for i in order[:limit]:
        r = rows[i]
        pool = [rows[j]["passage"] for j in rng.sample(range(len(rows)), len(rows))
                if rows[j]["title"] != r["title"]]
        texts = []
        for _ in range(branches):
            chosen, total = [], 0
            while total < branch_tokens and pool:
                chosen.append(pool.pop())
                total += tokens(chosen[-1]) + 2
            texts.append(chosen)
        home = rng.randrange(branches)
        texts[home].insert(rng.randrange(len(texts[home]) + 1), r["passage"])
        out.append({"id": r["id"], "question": ASK.format(question=r["question"]), "answers": r["answers"],
                    "texts": ["\n\n".join(t) for t in texts], "gold_branch": home})
    return out


def first_logprobs(ready) -> torch.Tensor:
    return torch.log_softmax(ready.logits[0].float(), -1).clone()


def run_route(lm, fork, trained, sampling, *, route: str, options=None) -> tuple[dict, torch.Tensor]:
    t0 = time.perf_counter()
    ready = prepare(lm, fork, route=route, synthesizer=trained if route == "cache" else None, options=options,
                    max_new_tokens=sampling.max_new_tokens)
    logp = first_logprobs(ready)
    layout = settings(trained, None, options)[0] if route == "cache" else None
    s = finish(lm, ready, sampling, t0, layout=layout, synthesizer=trained if route == "cache" else None)
    return {"answer": s.answer, "ttft_s": s.ttft_s, "prefill_tokens": s.prefill_tokens}, logp


def item_record(lm, trained, item: dict, answer_tokens: int) -> dict:
    fork = from_texts(lm, item["question"], item["texts"])
    sampling = SamplingParams(answer_tokens, 0.0)
    base = settings(trained, None, None)[1]
    score = lambda answer: contains_answer(T.extract("span", answer), item["answers"])  # noqa: E731
    variants = {}
    text, _ = run_route(lm, fork, trained, sampling, route="text")
    variants["text"] = {**text, "score": score(text["answer"])}
    plain, plain_logp = run_route(lm, fork, trained, sampling, route="cache", options=base)
    variants["cache"] = {**plain, "score": score(plain["answer"]), "bytes": sum(kv_nbytes(b.kv) for b in fork.branches)}
    for name, (keep, by, bits) in VARIANTS.items():
        options = dataclasses.replace(base, keep=keep, keep_by=by, kv_bits=bits)
        inline, logp = run_route(lm, fork, trained, sampling, route="cache", options=options)
        t0 = time.perf_counter()
        small = compress(lm, fork, options.compression, prompt_tokens(lm, fork))
        compress_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ahead = prepare(lm, small, synthesizer=trained, options=base, max_new_tokens=sampling.max_new_tokens)
        same = int(ahead.logits[0].argmax()) == int(logp.argmax())
        variants[name] = {**inline, "score": score(inline["answer"]), "ttft_precompressed_s": time.perf_counter() - t0,
                          "same_first_token_precompressed": same,
                          "compress_s": compress_s, "bytes": stored_bytes(small, options.compression),
                          "kept_tokens": sum(b.kv.length for b in small.branches),
                          "agrees": inline["answer"].strip() == plain["answer"].strip(),
                          "first_kl": float((plain_logp.exp() * (plain_logp - logp)).sum())}
    return {"id": item["id"], "branch_tokens": [len(b.token_ids) for b in fork.branches],
            "gold_branch": item["gold_branch"], "variants": variants}


def summary(records: list[dict], config: dict, lm) -> dict:
    text = [r["variants"]["text"]["score"] for r in records]
    full_bytes = statistics.fmean(r["variants"]["cache"]["bytes"] for r in records)
    rows = []
    for name in records[0]["variants"]:
        got = [r["variants"][name] for r in records]
        row = {"variant": name, **S.accuracy([g["score"] for g in got]),
               "ttft_median_s": statistics.median(g["ttft_s"] for g in got)}
        if name != "text":
            row["vs_text"] = S.paired([g["score"] for g in got], text)
            row["bytes_mean"] = statistics.fmean(g["bytes"] for g in got)
            row["bytes_ratio"] = row["bytes_mean"] / full_bytes
        if name not in ("text", "cache"):
            row["vs_cache"] = S.paired([g["score"] for g in got], [r["variants"]["cache"]["score"] for r in records])
            row["agreement"] = statistics.fmean(g["agrees"] for g in got)
            row["agreement_ci"] = list(S.interval([float(g["agrees"]) for g in got]))
            row["first_kl_median"] = statistics.median(g["first_kl"] for g in got)
            row["first_kl_mean"] = statistics.fmean(g["first_kl"] for g in got)
            row["ttft_precompressed_median_s"] = statistics.median(g["ttft_precompressed_s"] for g in got)
            row["compress_median_s"] = statistics.median(g["compress_s"] for g in got)
            row["kept_tokens_mean"] = statistics.fmean(g["kept_tokens"] for g in got)
        rows.append(row)
    tokens = statistics.fmean(sum(r["branch_tokens"]) for r in records)
    return {"environment": environment(lm), "config": config, "n": len(records), "branch_tokens_mean": tokens,
            "rows": rows}


def plot(result: dict, path: Path) -> None:
    """Left: how often a variant answers as the uncompressed cache route does, by the K/V it stores;
    right: its TTFT, inline (dots) and compressed beforehand (crosses), against text synthesis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "agreement" in r]
    text = next(r for r in result["rows"] if r["variant"] == "text")
    cache = next(r for r in result["rows"] if r["variant"] == "cache")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, r in enumerate(rows):
        color, x = f"C{k}", r["bytes_ratio"]
        lo, hi = r["agreement_ci"]
        left.errorbar(x, 100 * r["agreement"], yerr=[[100 * (r["agreement"] - lo)], [100 * (hi - r["agreement"])]],
                      fmt="o", capsize=3, color=color, label=r["variant"])
        right.scatter(x, r["ttft_median_s"] * 1000, marker="o", color=color)
        right.scatter(x, r["ttft_precompressed_median_s"] * 1000, marker="x", color=color)
    left.set(xlabel="branch K/V stored, fraction of uncompressed", ylabel="same answer as uncompressed, % (95% CI)",
             title=f"Fidelity (n={result['n']})", xlim=(0, 1.05), ylim=(-5, 105))
    left.legend(fontsize=8, loc="lower right")
    right.axhline(text["ttft_median_s"] * 1000, color="black", linestyle="--", linewidth=1, label="text synthesis")
    right.axhline(cache["ttft_median_s"] * 1000, color="gray", linestyle=":", linewidth=1, label="cache, uncompressed")
    right.scatter([], [], marker="o", color="gray", label="compressed inline")
    right.scatter([], [], marker="x", color="gray", label="compressed beforehand")
    right.set(xlabel="branch K/V stored, fraction of uncompressed", ylabel="TTFT, median (ms)", yscale="log",
              title=f"TTFT ({result['branch_tokens_mean']:.0f} branch tokens)", xlim=(0, 1.05))
    right.legend(fontsize=8, loc="center right")
    fig.suptitle(f"Branch-KV compression on {result['environment']['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="summary JSON (records beside it, .jsonl)")
    parser.add_argument("--model", help="model name or path (default: the default model)")
    parser.add_argument("--limit", type=int, default=40, help="items")
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument("--branch-tokens", type=int, default=1024, help="tokens of passages per branch (at least)")
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.limit < 1 or args.branches < 1 or args.branch_tokens < 1 or args.answer_tokens < 1:
        raise SystemExit("error: --limit, --branches, --branch-tokens and --answer-tokens must be positive")
    lm = load(args.model)
    trained = adapter.resolve(lm, "auto")
    chosen = items(lm, args.limit, args.branch_tokens, args.branches, args.seed)
    path = args.out.with_suffix(".jsonl")
    done = {r["id"] for r in read_records(path)} if path.exists() else set()
    with Records(path) as records:
        for n, item in enumerate(chosen, 1):
            if item["id"] not in done:
                records.append(item_record(lm, trained, item, args.answer_tokens))
            print(f"\r{n}/{len(chosen)} items", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ids = {i["id"] for i in chosen}
    mine = [r for r in read_records(path) if r["id"] in ids]
    config = {**vars(args), "out": str(args.out), "synthesizer": trained is not None,
              "variants": {k: {"keep": a, "keep_by": by, "kv_bits": b} for k, (a, by, b) in VARIANTS.items()}}
    result = summary(mine, config, lm)
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    for row in result["rows"]:
        extra = ""
        if "agreement" in row:
            extra = (f"  agrees {100 * row['agreement']:.0f}%  KL {row['first_kl_median']:.3f}  "
                     f"pre-compressed TTFT {1000 * row['ttft_precompressed_median_s']:.0f} ms  "
                     f"bytes {100 * row['bytes_ratio']:.0f}%")
        print(f"{row['variant']:>16}  n={row['n']}  accuracy {100 * row['accuracy']:5.1f}%  "
              f"TTFT {1000 * row['ttft_median_s']:.0f} ms{extra}")


if __name__ == "__main__":
    main()
