"""The one decode loop every route uses: masks from logical positions, the sampler, per-row stopping.

Positions are always explicit: in a composed cache the storage index of a key is not its position.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .kv import KV, from_cache, to_cache
from .model import LM


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. temperature 0 is greedy; `seed` makes sampling reproducible."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(eq=False)
class State:
    """Mutable decode state owned by one route: its own cache plus the logical position of every key.
    `key_pos` is -1 where a slot is padding. Functions that change it end in `_` or say so."""

    cache: DynamicCache
    key_pos: torch.Tensor   # [B, T] logical positions of the cached keys, -1 = padding
    next_pos: torch.Tensor  # [B] position of each row's next token
    key_bias: torch.Tensor | None = None  # [B, T] added to every query's attention logit on that key

    @classmethod
    def empty(cls, rows: int, device: torch.device) -> State:
        """A state with an empty cache for `rows` sequences."""
        none = torch.zeros((rows, 0), dtype=torch.long, device=device)
        return cls(DynamicCache(), none, torch.zeros(rows, dtype=torch.long, device=device))

    def select_(self, rows: torch.Tensor) -> None:
        """Keep only batch `rows` (in place on this state)."""
        self.cache.batch_select_indices(rows)
        self.key_pos, self.next_pos = self.key_pos[rows], self.next_pos[rows]
        if self.key_bias is not None:
            self.key_bias = self.key_bias[rows]


def attention_mask(key_pos: torch.Tensor, query_pos: torch.Tensor, windows: dict, dtype: torch.dtype,
                   key_bias: torch.Tensor | None = None):
    """Additive masks [B, 1, q, k] built from logical positions, or None where the model's own causal
    mask is the same (no padding, no bias, and positions equal storage indices).

    A key is visible when it is not padding, not after the query, and inside the layer's window;
    `key_bias` [B, k] is added on visible keys. Returns one tensor, or a dict by layer type when
    `windows` has several types (Gemma 3, Qwen3).
    """
    b, k = key_pos.shape
    q = query_pos.shape[1]
    storage = torch.arange(k, device=key_pos.device)
    plain = key_bias is None or not bool(key_bias.any())
    if plain and bool((key_pos == storage).all()) and bool((query_pos == storage[k - q :]).all()):
        return None
    bias = 0.0 if plain else key_bias[:, None, None, :].to(dtype)
    kp, qp = key_pos[:, None, None, :], query_pos[:, None, :, None]
    visible = (kp >= 0) & (kp <= qp)
    # finfo.min, not -inf: a padding query that sees nothing then stays finite instead of NaN
    low = torch.finfo(dtype).min
    masks = {
        kind: (torch.zeros(visible.shape, dtype=dtype, device=key_pos.device) + bias).masked_fill(
            ~(visible if w is None else visible & (kp > qp - w)), low
        )
        for kind, w in windows.items()
    }
    return masks[None] if None in masks else masks


def forward_(lm: LM, state: State, ids: torch.Tensor, pos: torch.Tensor, key_pos: torch.Tensor | None = None, *, keep: int = 1):
    """Run `ids` [B, q] at positions `pos` [B, q] over the state's cache, appending their K/V to it (in place).
    `key_pos` gives the positions recorded for the new keys (default `pos`; -1 marks padding).
    Returns the last column's logits [B, V] float32, or with keep > 1 the last `keep` columns' [B, keep, V]."""
    state.key_pos = torch.cat([state.key_pos, pos if key_pos is None else key_pos], dim=1)
    if state.key_bias is not None:
        state.key_bias = torch.cat([state.key_bias, torch.zeros_like(pos, dtype=state.key_bias.dtype)], dim=1)
    mask = attention_mask(state.key_pos, pos, lm.windows, lm.dtype, state.key_bias)
    out = lm.model(
        input_ids=ids, position_ids=pos, attention_mask=mask, cache=state.cache, use_cache=True, logits_to_keep=keep
    )
    state.next_pos = pos[:, -1] + 1
    return out.logits[:, -1].float() if keep == 1 else out.logits.float()


def prefill_rows(lm: LM, rows: list[list[int]] | list[tuple[int, ...]], prefix: KV | None = None) -> tuple[State, torch.Tensor]:
    """One batched forward of each row's tokens after an optional shared `prefix` (batch 1, not modified).

    Rows are right-aligned: padding sits between the prefix and a short row and is masked out, so the
    last column holds every row's next-token logits. Returns the new state and those logits [B, V]."""
    n, width = len(rows), max(map(len, rows))
    start = 0 if prefix is None else prefix.length
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.stop_ids[0]
    ids = torch.full((n, width), pad, dtype=torch.long)
    pos = torch.full((n, width), start, dtype=torch.long)  # padding queries see the prefix: finite, unused
    key_pos = torch.full((n, width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        pos[i, width - len(row) :] = key_pos[i, width - len(row) :] = torch.arange(start, start + len(row))
    dev = lm.device
    if prefix is None:
        state = State.empty(n, dev)
    else:
        shared = KV(tuple(k.expand(n, -1, -1, -1) for k in prefix.keys),
                    tuple(v.expand(n, -1, -1, -1) for v in prefix.values), prefix.positions)
        state = State(to_cache(shared), prefix.positions.to(dev)[None].expand(n, -1), pos[:, 0].to(dev))
    with torch.inference_mode():
        logits = forward_(lm, state, ids.to(dev), pos.to(dev), key_pos.to(dev))
    return state, logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Next token per row from logits [B, V]: greedy at temperature 0, else temperature + nucleus."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True, eq=False)
class Decoded:
    tokens: tuple[tuple[int, ...], ...]  # per row: generated ids, the stop token included when produced
    kv: tuple[KV | None, ...]            # per row: captured K/V (when capture_from was given)
    stopped: tuple[bool, ...]            # per row: ended on a stop token (False: hit max_new_tokens)
    first_token_time: float              # time.perf_counter() when the first token was sampled
    topk: tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], ...] = ()  # per row, per token: (ids, logprobs)


def decode_(
    lm: LM,
    state: State,
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    capture_from: int | None = None,
    close_turn: bool = False,
    on_token: Callable[[int, int], None] | None = None,
    topk: int = 0,
) -> Decoded:
    """Sample until every row stops (a stop id or max_new_tokens), consuming `state` (mutated in place).

    logits: [B, V] for each row's first new token. With `capture_from`, each row's final token is fed
    too, and the row's K/V from storage index `capture_from` on (padding dropped) is returned, so a
    branch keeps the K/V of every token it holds. `close_turn` makes a row that reaches the limit end
    on a stop token, so each branch is a closed turn. Finished rows leave the batch. With `topk`, each
    row also returns the top-k ids and log-probabilities of the distribution each token was drawn from.
    """
    stops = lm.stop_ids
    generator = torch.Generator(device=logits.device).manual_seed(params.seed)
    rows = list(range(logits.shape[0]))  # original row of each batch row
    tokens: list[list[int]] = [[] for _ in rows]
    kv: list[KV | None] = [None for _ in rows]
    stopped = [False for _ in rows]
    dists: list[list] = [[] for _ in rows]
    first = None
    with torch.inference_mode():
        while rows:
            nxt = sample(logits, params, generator)
            if first is None:
                if nxt.is_cuda:  # kernels run ahead of the host: the token exists once the device is done
                    torch.cuda.synchronize(nxt.device)
                first = time.perf_counter()
            if topk:
                best = torch.log_softmax(logits, -1).topk(topk, dim=-1)
                for j, r in enumerate(rows):
                    dists[r].append((best.indices[j].cpu(), best.values[j].cpu()))
            done = []
            for j, r in enumerate(rows):
                if close_turn and len(tokens[r]) == params.max_new_tokens - 1 and int(nxt[j]) not in stops:
                    nxt[j] = stops[0]
                tokens[r].append(int(nxt[j]))
                if on_token:
                    on_token(r, tokens[r][-1])
                stopped[r] = tokens[r][-1] in stops
                if stopped[r] or len(tokens[r]) >= params.max_new_tokens:
                    done.append(j)
            if capture_from is None and done:  # nothing to keep: drop finished rows before the next step
                keep = _keep_(state, done, len(rows))
                rows, nxt = [rows[j] for j in keep], nxt[keep]
                if not rows:
                    break
            logits = forward_(lm, state, nxt[:, None], state.next_pos[:, None])
            if capture_from is not None and done:
                for j in done:
                    kv[rows[j]] = row_kv(state, j, capture_from)
                keep = _keep_(state, done, len(rows))
                rows, logits = [rows[j] for j in keep], logits[keep]
    return Decoded(
        tuple(map(tuple, tokens)), tuple(kv), tuple(stopped), first or time.perf_counter(), tuple(map(tuple, dists))
    )


def _keep_(state: State, done: list[int], n: int) -> list[int]:
    """Drop batch rows `done` from the state (in place); the kept rows' indices."""
    keep = [j for j in range(n) if j not in done]
    if keep:
        state.select_(torch.tensor(keep, device=state.key_pos.device))
    return keep


def row_kv(state: State, row: int, start: int) -> KV:
    """A new batch-1 KV of `row`'s cached tokens from storage index `start` on, padding dropped."""
    pos = state.key_pos[row]
    index = torch.nonzero((pos >= 0) & (torch.arange(pos.shape[0], device=pos.device) >= start)).squeeze(-1)
    return from_cache(state.cache, pos[index], row=row, index=index)
