"""The trained parts of the cache route — a LoRA on the synthesizer, a cache mapper, a structural aid —
and their checkpoint: `synthesizer.safetensors` (LoRA and mapper tensors) plus `synthesizer.json` (the
base model's identity, the adapter config and the training recipe).

    trained = parsyn.adapter.resolve(lm, "auto")     # the packaged checkpoint when it fits lm, else None
    parsyn.synthesize(lm, fork, route="cache", synthesizer=trained)

The LoRA lives inside the model (`parsyn.lora`) but applies only to the synthesizer's own forwards:
workers and the text route always run the base model, even in the same batch.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_write, write_json
from .layout import LAYOUTS
from .lora import LoRA, detach
from .mapper import MapperConfig, build_mapper
from .model import LM, identity
from .rope import rope_of

FORMAT = "parsyn-synthesizer"
WEIGHTS, CONFIG = "synthesizer.safetensors", "synthesizer.json"
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "smollm2-135m-instruct"


@dataclass(frozen=True)
class AdapterConfig:
    lora: bool = True
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mapper: MapperConfig | None = None
    layout: str = "parallel"  # the layout the synthesizer was trained for: its default at synthesis
    recompute: int = 0        # structural aid: the first tokens of every branch recomputed at synthesis

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"AdapterConfig needs rank >= 1 and alpha > 0, got rank={self.rank}, alpha={self.alpha}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"AdapterConfig.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.recompute < 0:
            raise ValueError(f"AdapterConfig.recompute must be >= 0, got {self.recompute}")
        if not self.targets:
            raise ValueError("AdapterConfig.targets is empty")

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        data = dict(data)
        mapper = data.pop("mapper", None)
        if "targets" in data:
            data["targets"] = tuple(data["targets"])
        return cls(**data, mapper=MapperConfig(**mapper) if mapper else None)


@dataclass(eq=False)
class Synthesizer:
    """What the cache route adds to the base model once trained: a LoRA (inside the model, active only
    for the synthesizer's forwards), a cache mapper, and the layout and structural aid it was trained for.
    It is what `synthesis` routes take as their trained parts."""

    config: AdapterConfig
    mapper: nn.Module | None
    lora: LoRA | None
    base: dict                      # identity of the base model it was trained on
    recipe: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def layout(self) -> str:
        return self.config.layout

    @property
    def recompute(self) -> int:
        return self.config.recompute

    def active(self, rows: torch.Tensor | None = None) -> AbstractContextManager:
        """Within the block (this thread only), forwards apply the LoRA: to all rows or to `rows` [B] bool."""
        if self.lora is None or not self.config.lora:
            return nullcontext()
        return self.lora.active(rows)

    def parameters(self) -> list[nn.Parameter]:
        lora = self.lora.parameters() if self.lora is not None and self.config.lora else []
        return lora + (list(self.mapper.parameters()) if self.mapper is not None else [])


def attach(lm: LM, config: AdapterConfig) -> Synthesizer:
    """A new (untrained) synthesizer for `lm`: LoRA layers added to the model (inactive unless a route
    activates them), mapper at identity. A model holds one synthesizer's LoRA at a time: attaching
    replaces the previous one (a setup step, never done while requests run)."""
    detach(lm.model)
    lora = LoRA(lm.model, config.targets, config.rank, config.alpha) if config.lora else None
    mapper = None
    if config.mapper is not None:
        mapper = build_mapper(config.mapper, lm.config, rope_of(lm.model)).to(lm.device)
    return Synthesizer(config, mapper, lora, identity(lm))


def save(synthesizer: Synthesizer, lm: LM, path: Path) -> Path:
    """Write the checkpoint folder (atomically per file)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    if synthesizer.lora is not None:
        state = synthesizer.lora.state_dict()
        tensors.update({f"lora.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()})
    if synthesizer.mapper is not None:
        tensors.update({f"mapper.{k}": v.detach().float().cpu().contiguous()
                        for k, v in synthesizer.mapper.state_dict().items()})
    meta = {"format": FORMAT, "version": 1, "base": synthesizer.base, "adapter": asdict(synthesizer.config),
            "recipe": synthesizer.recipe}
    atomic_write(path / WEIGHTS, lambda p: save_file(tensors, str(p)))
    write_json(path / CONFIG, meta)
    return path


def load(lm: LM, path: Path) -> Synthesizer:
    """Load a checkpoint onto `lm`; ValueError if it is missing, corrupt, or made for another base model."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ValueError(f"not a parsyn checkpoint (needs {CONFIG} and {WEIGHTS}): {path}")
    try:
        meta = json.loads((path / CONFIG).read_text())
        config = AdapterConfig.from_dict(meta["adapter"])
        base = meta["base"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"checkpoint config {path / CONFIG} is corrupt: {error}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG} is not a {FORMAT} file")
    mine = identity(lm)
    if (base.get("config_hash"), base.get("tokenizer_hash")) != (mine["config_hash"], mine["tokenizer_hash"]):
        raise ValueError(
            f"checkpoint {path} was trained for base model '{base.get('name')}' (config {base.get('config_hash')}, "
            f"tokenizer {base.get('tokenizer_hash')}); the loaded model is '{mine['name']}' "
            f"(config {mine['config_hash']}, tokenizer {mine['tokenizer_hash']})"
        )
    try:
        tensors = load_file(str(path / WEIGHTS), device=str(lm.device))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"checkpoint weights {path / WEIGHTS} are corrupt or truncated: {error}") from None
    synthesizer = attach(lm, config)
    synthesizer.base, synthesizer.recipe, synthesizer.path = base, meta.get("recipe", {}), path
    _restore(lm, synthesizer, tensors, path)
    return synthesizer


def _restore(lm: LM, synthesizer: Synthesizer, tensors: dict, path: Path) -> None:
    lora = {k[5:]: v.to(lm.dtype) for k, v in tensors.items() if k.startswith("lora.")}
    mapped = {k[7:]: v for k, v in tensors.items() if k.startswith("mapper.")}
    if synthesizer.lora is not None:
        try:
            synthesizer.lora.load_state_dict(lora)
        except ValueError as error:
            raise ValueError(f"checkpoint {path}: {error}") from None
    if synthesizer.mapper is not None:
        try:
            synthesizer.mapper.load_state_dict(mapped)
        except RuntimeError as error:
            raise ValueError(f"checkpoint {path} mapper tensors do not fit: {str(error).splitlines()[0]}") from None


def resolve(lm: LM, choice: str | None) -> Synthesizer | None:
    """`none`/None: no adapter; `auto`: the packaged checkpoint when it was made for this model; else a path."""
    if choice in (None, "none"):
        return None
    if choice == "auto":
        if not (DEFAULT_CHECKPOINT / CONFIG).is_file():
            return None
        base = json.loads((DEFAULT_CHECKPOINT / CONFIG).read_text()).get("base", {})
        mine = identity(lm)
        if (base.get("config_hash"), base.get("tokenizer_hash")) != (mine["config_hash"], mine["tokenizer_hash"]):
            return None
        return load(lm, DEFAULT_CHECKPOINT)
    return load(lm, Path(choice))
