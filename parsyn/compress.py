"""Branch-KV compression before synthesis: keep the branch tokens that matter, store K/V in 8 bits.

`keep` (SnapKV-style): an observation window of queries ranks each branch's tokens by the attention it
gives them — summed over layers, heads and queries, then max-pooled over neighbouring tokens so that kept
tokens come in runs. By default (`by="prompt"`) the window is the synthesizer's own prompt (instruction
and question), run after each branch over the prefix and that branch and then discarded: the tokens the
synthesizer would attend to most, chosen per question. With `by="tail"` it is the branch's last `window`
tokens, run once more (their K/V come out as they were): a ranking that does not depend on the prompt. A
branch keeps its first `sinks` tokens (its opening), its last `window` tokens, and the best-ranked rest up
to `keep` of its length. Kept tokens keep their positions: a compressed branch spans the same
positions as before with holes, so the synthesizer reads the survivors where they were computed.
One choice per token serves every layer and head (SnapKV chooses per head): the decode state keeps one
set of positions for all layers.

`bits=8`: K/V stored as int8 with one scale per (layer, kv head, channel), symmetric (absmax / 127) —
keys have outlier channels, so a channel gets its own scale. `quantize` gives the stored form and its
size; a compressed fork holds its dequantized values, the values the synthesizer reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .chat import DEFAULT_INSTRUCTION, ChatFormat
from .cpu import observing
from .forward import State, feed_, stack
from .kv import KV
from .model import LM
from .workers import Fork


@dataclass(frozen=True)
class Compression:
    """How branches are compressed before synthesis (the defaults change nothing).

    keep: the fraction of each branch's tokens kept (SnapKV-style; 1 keeps all).
    by: what ranks them: "prompt" (the synthesizer's prompt's attention) or "tail" (the branch's last
        `window` tokens' attention).
    window: the branch's last tokens, always kept (and the observation window of by="tail").
    sinks: the branch's first tokens, always kept (its opening: role and turn header).
    pool: max-pooling width over the ranking (odd), so neighbours of a strong token survive with it.
    bits: 8 stores K/V as int8 with per-channel scales; None keeps the model's dtype.
    """

    keep: float = 1.0
    by: str = "prompt"
    window: int = 16
    sinks: int = 4
    pool: int = 7
    bits: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep must be a fraction in (0, 1], got {self.keep}")
        if self.window < 1 or self.sinks < 0 or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"need window >= 1, sinks >= 0 and an odd pool >= 1, got {self}")
        if self.by not in ("prompt", "tail"):
            raise ValueError(f"by must be 'prompt' or 'tail', got {self.by!r}")
        if self.bits not in (None, 8):
            raise ValueError(f"bits must be 8 or None (the model's dtype), got {self.bits}")

    @property
    def active(self) -> bool:
        return self.keep < 1 or self.bits is not None


@dataclass(frozen=True, eq=False)
class QuantizedKV:
    """A KV stored in int8: per layer keys/values [B, H, T, D] int8 and their scales [B, H, 1, D]."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    key_scales: tuple[torch.Tensor, ...]
    value_scales: tuple[torch.Tensor, ...]
    positions: torch.Tensor

    @property
    def nbytes(self) -> int:
        tensors = (*self.keys, *self.values, *self.key_scales, *self.value_scales, self.positions)
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> KV:
        """The KV these bytes stand for, in `dtype` (new tensors)."""
        return KV(tuple(q.to(dtype) * s.to(dtype) for q, s in zip(self.keys, self.key_scales)),
                  tuple(q.to(dtype) * s.to(dtype) for q, s in zip(self.values, self.value_scales)),
                  self.positions.clone())


def _int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [B, H, T, D] as int8 and a scale per channel [B, H, 1, D] (absmax over the tokens / 127)."""
    scale = t.abs().amax(dim=2, keepdim=True).float().clamp_min(1e-8) / 127
    return (t.float() / scale).round().clamp_(-127, 127).to(torch.int8), scale


def quantize(kv: KV) -> QuantizedKV:
    """`kv` in int8 with per-channel scales (its stored form); `kv` is not modified."""
    keys, values = zip(*(_int8(k) for k in kv.keys)), zip(*(_int8(v) for v in kv.values))
    (qk, sk), (qv, sv) = (tuple(map(tuple, pair)) for pair in (keys, values))
    return QuantizedKV(qk, qv, sk, sv, kv.positions.clone())


def kv_nbytes(kv: KV) -> int:
    """Bytes of a KV as stored: keys, values and positions."""
    return kv.nbytes + kv.positions.numel() * kv.positions.element_size()


def window_attention(lm: LM, fork: Fork, window: int, probe: list[int] | None = None) -> list[torch.Tensor]:
    """Per branch, the attention each of its tokens before its last `window` gets ([n - w], summed over
    layers, heads and queries) from the observation queries: `probe` (token ids, e.g. the synthesizer's
    prompt) fed right after the branch, or, without one, the branch's own last `window` tokens fed again.
    One batched forward over every branch; branches no longer than the window get an empty ranking. The
    fork is not modified."""
    ranked = [i for i, b in enumerate(fork.branches) if b.kv.length > window]
    out = [torch.zeros(0) for _ in fork.branches]
    if not ranked:
        return out
    states, rows, positions = [], [], []
    for i in ranked:
        b = fork.branches[i].kv
        body = b if probe else b.take(slice(0, b.length - window))
        states.append(State.over([fork.prefix, body], torch.cat([fork.prefix.positions, body.positions])[None]))
        if probe:
            after = int(b.positions[-1]) + 1
            rows.append(list(probe))
            positions.append(list(range(after, after + len(probe))))
        else:
            rows.append(list(fork.branches[i].token_ids[-window:]))
            positions.append(b.positions[-window:].tolist())
    state = states[0] if len(states) == 1 else stack(states)
    width = state.key_pos.shape[1]
    total = torch.zeros(len(ranked), width + max(map(len, rows)), device=lm.device)
    seen = []

    def add(module, probs: torch.Tensor) -> None:  # probs [B, H_kv, g, q, k]
        total.add_(probs.sum(dim=(1, 2, 3)))
        seen.append(module)

    with torch.inference_mode(), observing(add):
        feed_(lm, state, rows, positions)
    if not seen:
        raise ValueError("keeping branch tokens by attention needs parsyn's CPU attention; this model runs "
                         f"'{lm.model.config._attn_implementation}'")
    for j, i in enumerate(ranked):
        n = fork.branches[i].kv.length
        end = width if not probe else width - window  # the branch's own tokens end at width (rows right-aligned)
        out[i] = total[j, end - (n - window): end].cpu()
    return out


def kept(scores: torch.Tensor, length: int, c: Compression) -> list[int]:
    """Offsets kept in a branch of `length` tokens whose tokens before the window scored `scores`."""
    budget = max(round(c.keep * length), min(length, c.sinks + c.window))
    if budget >= length or not len(scores):
        return list(range(length))
    pooled = F.max_pool1d(scores[None, None], c.pool, stride=1, padding=c.pool // 2)[0, 0] if c.pool > 1 else scores
    sure = set(range(min(c.sinks, length))) | set(range(length - c.window, length))
    pooled = pooled.clone()
    pooled[[j for j in sure if j < len(pooled)]] = float("-inf")
    extra = max(0, budget - len(sure))
    chosen = pooled.topk(min(extra, len(pooled))).indices.tolist() if extra else []
    return sorted(sure | set(chosen))


def compress(lm: LM, fork: Fork, c: Compression, prompt_ids: list[int] | None = None) -> Fork:
    """A new fork whose branches hold the compressed K/V (token ids and texts unchanged); the fork is not
    modified. Keeping tokens needs branches whose K/V still cover their tokens one for one. `prompt_ids`:
    the synthesizer's prompt that ranks them with by="prompt" (default: the prompt of the default
    instruction for the fork's question)."""
    if not c.active:
        return fork
    scores = _ranking(lm, fork, c, prompt_ids) if c.keep < 1 else None
    branches = []
    for i, b in enumerate(fork.branches):
        kv = b.kv
        if scores is not None:
            kv = kv.take(torch.tensor(kept(scores[i], kv.length, c)))
        if c.bits == 8:
            kv = quantize(kv).dequantize(kv.keys[0].dtype)
        branches.append(dataclasses.replace(b, kv=kv))
    return dataclasses.replace(fork, branches=tuple(branches))


def _ranking(lm: LM, fork: Fork, c: Compression, prompt_ids: list[int] | None) -> list[torch.Tensor]:
    """Each branch's token scores under `c.by` (see `window_attention`); its K/V must cover its tokens."""
    for i, b in enumerate(fork.branches):
        if b.kv.length != len(b.token_ids):
            raise ValueError(f"branch {i + 1} is already compressed (its K/V hold {b.kv.length} of its "
                             f"{len(b.token_ids)} tokens)")
    if c.by == "tail":
        return window_attention(lm, fork, c.window)
    if prompt_ids is None:
        prompt_ids = ChatFormat(lm.tokenizer).synthesis_ids(fork.question, fork.system, DEFAULT_INSTRUCTION)
    return window_attention(lm, fork, c.window, list(prompt_ids))


def stored_bytes(fork: Fork, c: Compression) -> int:
    """Bytes of the fork's branch K/V in their stored form under `c` (int8 and scales with bits=8)."""
    return sum(quantize(b.kv).nbytes if c.bits == 8 else kv_nbytes(b.kv) for b in fork.branches)
