"""The trained parts of the cache route — a LoRA on the synthesizer, a cache mapper, a structural aid —
and their checkpoint: `synthesizer.safetensors` (LoRA and mapper tensors) plus `synthesizer.json` (the
base model's identity, the adapter config, the training recipe and its figures).

The LoRA lives inside the model (through PEFT) but is switched off except while the cache route
synthesizes: workers and the text route always run the base model.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_write, write_json
from .layout import LAYOUTS
from .mapper import MapperConfig, build_mapper
from .model import LM
from .rope import rope_of

ADAPTER = "parsyn"
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
    """What the cache route adds to the base model once trained."""

    config: AdapterConfig
    mapper: nn.Module | None
    base: dict                      # identity of the base model it was trained on
    recipe: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "(in memory)"

    def parameters(self, lm: LM) -> list[nn.Parameter]:
        params = [p for n, p in lm.model.named_parameters() if f".{ADAPTER}." in n or n.endswith(f".{ADAPTER}")]
        return params + (list(self.mapper.parameters()) if self.mapper is not None else [])


@contextmanager
def lora_on(lm: LM, synthesizer: Synthesizer | None):
    """Switch the synthesizer's LoRA on inside the block (and off again after)."""
    if synthesizer is None or not synthesizer.config.lora:
        yield
        return
    _switch(lm.model, True)
    try:
        yield
    finally:
        _switch(lm.model, False)


_LAYERS: weakref.WeakKeyDictionary[nn.Module, list[LoraLayer]] = weakref.WeakKeyDictionary()


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    """The model's LoRA layers, found once per `attach` (a scan of every module costs ~3 ms)."""
    if model not in _LAYERS:
        _LAYERS[model] = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return _LAYERS[model]


def _switch(model: nn.Module, on: bool) -> None:
    """Turn the LoRA layers on or off by the flag their forward reads (PEFT's own, set directly on
    purpose; peft is pinned and the tests check both states against the base model). `enable_adapters` also
    rewrites every adapter parameter's requires_grad: it costs ~4 ms per switch (three switches come
    before a cache route's first token), and a flag cleared before backward drops the LoRA's gradients."""
    for layer in _lora_layers(model):
        layer._disable_adapters = not on


def identity(lm: LM) -> dict:
    """Name plus hashes of the model config and the tokenizer: what a checkpoint must match."""
    settings = lm.model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
                     "_attn_implementation_autoset", "quantization_config", "use_cache"):
        settings.pop(volatile, None)
    tok = lm.tokenizer
    vocab = json.dumps(sorted(tok.get_vocab().items())) + json.dumps(tok.all_special_tokens) + str(tok.chat_template)
    return {
        "name": lm.name,
        "config_hash": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "tokenizer_hash": hashlib.sha256(vocab.encode()).hexdigest()[:16],
    }


def attach(lm: LM, config: AdapterConfig) -> Synthesizer:
    """A new (untrained) synthesizer for `lm`: LoRA injected into the model (switched off), mapper at identity."""
    for layer in _lora_layers(lm.model):  # a model holds one synthesizer at a time
        layer.delete_adapter(ADAPTER)
    if ADAPTER in getattr(lm.model, "peft_config", {}):
        del lm.model.peft_config[ADAPTER]
        if not lm.model.peft_config:
            del lm.model.peft_config
    if config.lora:
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=list(config.targets), bias="none")
        inject_adapter_in_model(lora, lm.model, adapter_name=ADAPTER)
        _LAYERS.pop(lm.model, None)
        _switch(lm.model, False)
        lm.model.requires_grad_(False)
    mapper = None
    if config.mapper is not None:
        mapper = build_mapper(config.mapper, lm.config, rope_of(lm.model)).to(lm.device)
    return Synthesizer(config, mapper, identity(lm))


def save(synthesizer: Synthesizer, lm: LM, path: Path) -> Path:
    """Write the checkpoint folder (atomically per file)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    if synthesizer.config.lora:
        state = get_peft_model_state_dict(lm.model, adapter_name=ADAPTER)
        tensors.update({f"lora.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()})
    if synthesizer.mapper is not None:
        tensors.update({f"mapper.{k}": v.detach().float().cpu().contiguous() for k, v in synthesizer.mapper.state_dict().items()})
    meta = {"format": FORMAT, "version": 1, "base": synthesizer.base, "adapter": asdict(synthesizer.config),
            "recipe": synthesizer.recipe, "metrics": synthesizer.metrics}
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
    synthesizer.base, synthesizer.recipe, synthesizer.metrics, synthesizer.path = base, meta.get("recipe", {}), meta.get("metrics", {}), path
    _restore(lm, synthesizer, tensors, path)
    return synthesizer


def _restore(lm: LM, synthesizer: Synthesizer, tensors: dict, path: Path) -> None:
    lora = {k[5:]: v.to(lm.dtype) for k, v in tensors.items() if k.startswith("lora.")}
    mapped = {k[7:]: v for k, v in tensors.items() if k.startswith("mapper.")}
    if synthesizer.config.lora:
        expected = set(get_peft_model_state_dict(lm.model, adapter_name=ADAPTER))
        if set(lora) != expected:
            raise ValueError(f"checkpoint {path} LoRA tensors do not fit the model ({len(lora)} given, {len(expected)} expected)")
        set_peft_model_state_dict(lm.model, lora, adapter_name=ADAPTER)
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
