"""Fidelity of cache routes to text synthesis: the gates of the recipe search and the final report.

For every variant (layout × which trained parts are on):
- held-out KL: mean KL(teacher || route) per answer token on held-out distillation items, and at the
  value positions (answer tokens copied from a branch);
- agreement: the route's greedy answer equals the text route's (the teacher's) token for token;
- token agreement: under teacher forcing, how often the route's top token is the teacher's next token;
- probe: on the facts-over-branches probe, how often the answer holds the gold value ("hits") and how
  often it equals the text route's answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..adapter import Synthesizer
from ..batch import answers
from ..model import LM
from ..probe import probe_items
from ..sampling import SamplingParams
from ..scoring import contains_answer, kl_per_position
from ..synthesis import CacheOptions, teacher_forced
from ..workers import from_ids, from_texts


@dataclass(frozen=True)
class Variant:
    name: str
    layout: str
    synthesizer: Synthesizer | None = None
    options: CacheOptions | None = None


def ablations(synthesizer: Synthesizer | None, layouts: Sequence[str] = ("parallel", "sequential")) -> list[Variant]:
    """Raw routes, then the trained synthesizer whole and with parts switched off (mapper only, LoRA only)."""
    out = [Variant(f"raw {layout}", layout) for layout in layouts]
    if synthesizer is None:
        return out
    config = synthesizer.config
    for layout in layouts:
        out.append(Variant(f"trained {layout}", layout, synthesizer))
        if config.lora and synthesizer.mapper is not None:
            no_lora = dataclasses.replace(synthesizer, config=dataclasses.replace(config, lora=False))
            out.append(Variant(f"mapper only {layout}", layout, no_lora))
            out.append(Variant(f"LoRA only {layout}", layout, dataclasses.replace(synthesizer, mapper=None)))
        if config.recompute:
            out.append(Variant(f"trained {layout}, no aid", layout, synthesizer, CacheOptions()))
    return out


def evaluate(
    lm: LM,
    variants: Sequence[Variant],
    held_out: Sequence[dict],
    *,
    probe_size: int = 100,
    answer_tokens: int = 24,
    probe_tokens: int = 16,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row of figures per variant, plus a first row for the text route itself on the probe."""
    say = progress or (lambda _: None)
    forks = [_fork(lm, item) for item in held_out]
    teacher = [tuple(item["answer_ids"]) for item in held_out]
    instructions = [item["instruction"] for item in held_out]
    probe = probe_items(probe_size)
    probe_forks = [from_texts(lm, p.question, p.branches) for p in probe]
    probe_sampling = SamplingParams(probe_tokens, 0.0)
    say("text route on the probe")
    text_probe = [t for _, t in answers(lm, probe_forks, route="text", sampling=probe_sampling)]
    rows = [{"variant": "text", "layout": None,
             "probe_hits": _share(contains_answer(t, [p.answer]) for t, p in zip(text_probe, probe)),
             "probe_agreement": 1.0, "agreement": 1.0, "token_agreement": 1.0, "kl": 0.0, "kl_value": 0.0}]
    for v in variants:
        say(v.name)
        kl, kl_value, tokens = _held_out_kl(lm, v, held_out, forks)
        greedy = answers(lm, forks, route="cache", layout=v.layout, instructions=instructions,
                         sampling=SamplingParams(answer_tokens, 0.0), synthesizer=v.synthesizer, options=v.options)
        said = [t for _, t in answers(lm, probe_forks, route="cache", layout=v.layout, sampling=probe_sampling,
                                      synthesizer=v.synthesizer, options=v.options)]
        rows.append({
            "variant": v.name, "layout": v.layout,
            "agreement": _share(tuple(g) == t for (g, _), t in zip(greedy, teacher)),
            "token_agreement": tokens, "kl": kl, "kl_value": kl_value,
            "probe_hits": _share(contains_answer(s, [p.answer]) for s, p in zip(said, probe)),
            "probe_agreement": _share(s == t for s, t in zip(said, text_probe)),
        })
    return rows


def _held_out_kl(lm: LM, variant: Variant, items: Sequence[dict], forks: Sequence) -> tuple[float, float, float]:
    """Mean KL per answer token, at value tokens, and the share of teacher-forced top-1 matches (`forks`:
    the items' forks, prefilled once for every variant: a fork is never modified)."""
    total, count, value_total, value_count, same = 0.0, 0, 0.0, 0, 0
    with torch.no_grad():
        for item, f in zip(items, forks):
            logits = teacher_forced(lm, f, item["prompt_ids"], item["answer_ids"], layout=variant.layout,
                                    synthesizer=variant.synthesizer, options=variant.options)
            kl = kl_per_position(logits, torch.tensor(item["topk_ids"]), torch.tensor(item["topk_logprobs"]))
            mask = torch.tensor(item["value_mask"], dtype=torch.bool)
            total, count = total + kl.sum().item(), count + kl.numel()
            value_total, value_count = value_total + kl[mask].sum().item(), value_count + int(mask.sum())
            same += (logits.argmax(-1).cpu() == torch.tensor(item["answer_ids"])).sum().item()
    return total / max(count, 1), value_total / max(value_count, 1), same / max(count, 1)


def _fork(lm: LM, item: dict):
    return from_ids(lm, item.get("question") or "?", item["prefix_ids"], item["branch_ids"])


def _share(flags) -> float:
    flags = list(flags)
    return sum(map(bool, flags)) / max(len(flags), 1)


def table(rows: Sequence[dict]) -> str:
    """A markdown table of the rows."""
    lines = ["| route | greedy agreement | token agreement | KL / answer token | KL at value tokens | probe hits "
             "| probe agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {100 * r['agreement']:.0f}% | {100 * r['token_agreement']:.0f}% | "
                     f"{r['kl']:.3f} | {r['kl_value']:.3f} | "
                     f"{100 * r['probe_hits']:.0f}% | {100 * r['probe_agreement']:.0f}% |")
    return "\n".join(lines)
