"""`route="auto"`: a per-request quality gate between the cache route and text synthesis.

The cache route is prepared first (its prompt prefilled over the composed cache). A risk score is read from
its first-token distribution, optionally together with the other layout's (a second, cheap prompt prefill):

- `confidence`: 1 - p(top token) of the cache route's first token;
- `layouts`: the mean of that and the total-variation distance between the two layouts' first-token
  distributions (branches read differently when their positions change: the composed cache is ambiguous).

Below `cache_below` the prepared cache route decodes on; below `recompute_below` the cache route runs again
with the first `recompute` tokens of every branch recomputed; above, text synthesis runs. The thresholds come
from `parsyn calibrate` on held-out evaluation items, for a user-given regression budget. Time to first token
counts everything, the gate's own forwards included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from .files import read_json, write_json
from .model import LM
from .sampling import SamplingParams
from .synthesis import (
    DEFAULT_INSTRUCTION,
    FIRST_TOP,
    SYNTH_SAMPLING,
    Prepared,
    Synthesis,
    Trained,
    finish,
    prepare,
    settings,
    top_logprobs,
)
from .workers import Fork

SIGNALS = ("confidence", "layouts")
CHOICES = ("cache", "recompute", "text")
FORMAT = "parsyn-gate"


@dataclass(frozen=True)
class Gate:
    """Calibrated thresholds of the risk score, and what they were calibrated for."""

    signal: str = "confidence"
    cache_below: float = 0.5
    recompute_below: float = 0.5
    recompute: int = 8
    trained: bool = False         # calibrated with a trained synthesizer on the cache route
    layout: str | None = None     # the cache route's layout it was calibrated on (None: the synthesizer's own)
    max_regress: float | None = None
    model: str = ""
    calibration: dict | None = None  # what calibration measured (items, rates, mean TTFT)

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"unknown gate signal '{self.signal}' (choose from {', '.join(SIGNALS)})")
        if not 0 <= self.cache_below <= self.recompute_below:  # above 1 (the largest risk): always below
            raise ValueError(f"gate thresholds must satisfy 0 <= cache_below <= recompute_below, got "
                             f"{self.cache_below} and {self.recompute_below}")
        if self.recompute < 0:
            raise ValueError(f"gate recompute must be >= 0, got {self.recompute}")
        if self.layout not in (None, "parallel", "sequential"):
            raise ValueError(f"gate layout must be parallel or sequential, got {self.layout!r}")
        check_budget(self.max_regress)

    def choose(self, risk: float) -> str:
        return "cache" if risk < self.cache_below else "recompute" if risk < self.recompute_below else "text"

    def save(self, path) -> None:
        write_json(path, {"format": FORMAT, "version": 1, **asdict(self)})

    @classmethod
    def load(cls, path) -> Gate:
        data = read_json(path, "gate file")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a parsyn gate file (make one with `parsyn calibrate`)")
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        try:
            return cls(**fields)
        except TypeError as error:
            raise ValueError(f"{path}: {error}") from None


def check_budget(max_regress: float | None) -> None:
    if max_regress is not None and not (isinstance(max_regress, (int, float)) and 0 <= max_regress <= 1):
        raise ValueError(f"the regression budget must be a fraction in [0, 1], got {max_regress}")


def check_gate(gate: Gate, lm: LM | None, synthesizer: Trained | None) -> None:
    """Refuse a gate calibrated for another model, or with(out) a trained synthesizer where it runs without (with)."""
    if gate.trained != (synthesizer is not None):
        raise ValueError(f"this gate was calibrated {'with' if gate.trained else 'without'} a trained "
                         f"synthesizer; run it {'with' if gate.trained else 'without'} one, or calibrate again")
    if lm is not None and gate.model and gate.model != lm.name:
        raise ValueError(f"this gate was calibrated on {gate.model}, not {lm.name}; calibrate one on an evaluation "
                         "of this model")


def risk(first: Sequence[Sequence[float]], other: Sequence[Sequence[float]] | None = None) -> float:
    """The gate's risk from first-token alternatives ((id, log-probability) pairs, likeliest first): the
    cache route's, and for the `layouts` signal the other layout's. Both are top-k lists, so the distance is
    taken over the tokens they name (what lies outside is a few percent of mass at most)."""
    doubt = 1.0 - math.exp(first[0][1])
    if other is None:
        return doubt
    p = {int(t): math.exp(lp) for t, lp in first}
    q = {int(t): math.exp(lp) for t, lp in other}
    distance = 0.5 * sum(abs(p.get(t, 0.0) - q.get(t, 0.0)) for t in p.keys() | q.keys())
    return 0.5 * (doubt + min(distance, 1.0))


def synthesize_auto(lm: LM, fork: Fork, gate: Gate, *, sampling: SamplingParams = SYNTH_SAMPLING,
                    synthesizer: Trained | None = None, instruction: str = DEFAULT_INSTRUCTION,
                    on_token=None) -> tuple[Synthesis, dict]:
    """Synthesize by the route the gate picks; returns the synthesis (its `gate` holds the decision) and the
    decision (risk, signal, choice)."""
    t0 = time.perf_counter()
    ready, layout, decision = decide(lm, fork, gate, synthesizer=synthesizer, instruction=instruction,
                                     max_new_tokens=sampling.max_new_tokens)
    s = finish(lm, ready, sampling, t0, layout=layout, synthesizer=synthesizer, on_token=on_token)
    return replace(s, gate=decision), decision


def decide(lm: LM, fork: Fork, gate: Gate, *, synthesizer: Trained | None = None,
           instruction: str = DEFAULT_INSTRUCTION, max_new_tokens: int = 0) -> tuple[Prepared, str | None, dict]:
    """The gate's decision on `fork`, and the route it chose prepared up to its first token: (prepared route,
    its layout or None for text, decision). Decoding is left to the caller (`finish`, or a server's batch)."""
    check_gate(gate, lm, synthesizer)
    layout, options = settings(synthesizer, gate.layout, None)
    ready = prepare(lm, fork, route="cache", layout=layout, synthesizer=synthesizer, instruction=instruction,
                    max_new_tokens=max_new_tokens)
    other = None
    if gate.signal == "layouts":
        flip = "sequential" if layout == "parallel" else "parallel"
        other = top_logprobs(prepare(lm, fork, route="cache", layout=flip, synthesizer=synthesizer,
                                     instruction=instruction, max_new_tokens=max_new_tokens).logits[0], FIRST_TOP)
    score = risk(top_logprobs(ready.logits[0], FIRST_TOP), other)
    choice = gate.choose(score)
    if choice == "recompute":
        more = replace(options, recompute=max(options.recompute, gate.recompute))
        ready = prepare(lm, fork, route="cache", layout=layout, synthesizer=synthesizer, options=more,
                        instruction=instruction, max_new_tokens=max_new_tokens)
    elif choice == "text":
        ready = prepare(lm, fork, route="text", instruction=instruction, max_new_tokens=max_new_tokens)
    return ready, None if choice == "text" else layout, {"risk": score, "choice": choice, "signal": gate.signal}
