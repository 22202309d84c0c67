"""The trained parts of the cache route — a LoRA on the synthesizer, a cache mapper, a structural aid —
and their checkpoint: `synthesizer.safetensors` (LoRA and mapper tensors) plus `synthesizer.json` (the
base model's identity, the adapter config, the training recipe and the weights' sha256).

    trained = parsyn.adapter.resolve(lm, "auto")     # the packaged checkpoint when it fits lm, else None
    parsyn.synthesize(lm, fork, route="cache", synthesizer=trained)

The LoRA lives inside the model (`parsyn.lora`) but applies only to the synthesizer's own forwards:
workers and the text route always run the base model, even in the same batch.

A load trusts nothing in the folder: the weights must match the sha256 that synthesizer.json records,
hold exactly the tensors its config needs (no more, no fewer, each of the shape this model needs) and
only finite values; every field of the config must have its type and range. A load that fails leaves
the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from .files import atomic_write, write_json
from .layout import LAYOUTS
from .lora import LoRA, LoRALinear, detach
from .mapper import MAPPER_KINDS, MapperConfig, build_mapper
from .model import LM, identity
from .rope import rope_of

FORMAT = "parsyn-synthesizer"
VERSION = 2  # 2: synthesizer.json records the weights' sha256; 1 (no checksum) still loads, unverified
WEIGHTS, CONFIG = "synthesizer.safetensors", "synthesizer.json"
PACKAGED = Path(__file__).parent / "checkpoints"  # one folder per base model, found by `auto`
DEFAULT_CHECKPOINT = PACKAGED / "smollm2-135m-instruct"
log = logging.getLogger("parsyn")

_BOUNDS = (("at_least", ">=", operator.ge), ("above", ">", operator.gt), ("below", "<", operator.lt),
           ("at_most", "<=", operator.le))


def check_number(where: str, value, *, integer: bool = False, **bounds) -> None:
    """ValueError naming `where` (e.g. "TrainConfig.lr") unless `value` is a finite number — an int when
    `integer`, never a bool — within `bounds` (at_least, above, below, at_most)."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and not isinstance(value, bool)
    wanted = [(sym, op, bounds[name]) for name, sym, op in _BOUNDS if bounds.get(name) is not None]
    if ok and all(op(value, limit) for _, op, limit in wanted):
        return
    kind = "an integer" if integer else "a finite number"
    limits = " and ".join(f"{sym} {limit}" for sym, _, limit in wanted)
    raise ValueError(f"{where} must be {kind}{' ' + limits if limits else ''}, got {value!r}")


def known_fields(cls: type, data, where: str) -> dict:
    """`data` as a dict of `cls`'s fields; ValueError naming `where` when it is no dict or has other keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {', '.join(map(repr, unknown))}")
    return dict(data)


def _check_mapper(values: dict) -> None:
    """MapperConfig's fields typed and in range (checked before MapperConfig's own comparisons run)."""
    if values.get("kind") not in MAPPER_KINDS:
        raise ValueError(f"MapperConfig.kind must be one of {', '.join(MAPPER_KINDS)}, got {values.get('kind')!r}")
    for name in ("hidden", "rank", "max_branches"):
        check_number(f"MapperConfig.{name}", values.get(name), integer=True, at_least=1)
    check_number("MapperConfig.bound", values.get("bound"), above=0, at_most=1)


def _mapper_from(data) -> MapperConfig | None:
    if data is None:
        return None
    data = known_fields(MapperConfig, data, "AdapterConfig.mapper")
    _check_mapper({f.name: f.default for f in fields(MapperConfig)} | data)
    return MapperConfig(**data)


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
        if not isinstance(self.lora, bool):
            raise ValueError(f"AdapterConfig.lora must be true or false, got {self.lora!r}")
        check_number("AdapterConfig.rank", self.rank, integer=True, at_least=1)
        check_number("AdapterConfig.alpha", self.alpha, above=0)
        check_number("AdapterConfig.dropout", self.dropout)
        if self.dropout != 0:
            raise ValueError(f"AdapterConfig.dropout must be 0 (parsyn's LoRA has no dropout), got {self.dropout!r}")
        check_number("AdapterConfig.recompute", self.recompute, integer=True, at_least=0)
        targets = self.targets
        if (not isinstance(targets, (tuple, list)) or not targets
                or not all(isinstance(t, str) and t for t in targets)):
            raise ValueError(f"AdapterConfig.targets must be a non-empty list of layer names, got {targets!r}")
        object.__setattr__(self, "targets", tuple(targets))
        if self.mapper is not None:
            if not isinstance(self.mapper, MapperConfig):
                raise ValueError(f"AdapterConfig.mapper must be a MapperConfig or None, got {self.mapper!r}")
            _check_mapper(asdict(self.mapper))
        if self.layout not in LAYOUTS:
            raise ValueError(f"AdapterConfig.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        data = known_fields(cls, data, "AdapterConfig")
        mapper = _mapper_from(data.pop("mapper", None))
        return cls(**data, mapper=mapper)


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


def _targets(model: nn.Module, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each layer a LoRA on `targets` wraps, by module path — whether or not a
    LoRA is attached now — without changing the model."""
    out = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, (nn.Linear, LoRALinear)):
            out[name] = (module.in_features, module.out_features)
    return out


def _check_rank(lm: LM, config: AdapterConfig) -> dict[str, tuple[int, int]]:
    """The targeted layers; ValueError unless the rank fits every one (rank <= min(in, out))."""
    layers = _targets(lm.model, config.targets) if config.lora else {}
    if config.lora and not layers:
        raise ValueError(f"AdapterConfig.targets: no linear layer of the model is named {', '.join(config.targets)}")
    if layers:
        name, dims = min(layers.items(), key=lambda kv: min(kv[1]))
        if config.rank > min(dims):
            raise ValueError(f"AdapterConfig.rank {config.rank} is too large for this model: at most {min(dims)} "
                             f"(the smallest targeted layer, {name}, maps {dims[0]} to {dims[1]} features)")
    return layers


def attach(lm: LM, config: AdapterConfig) -> Synthesizer:
    """A new (untrained) synthesizer for `lm`: LoRA layers added to the model (inactive unless a route
    activates them), mapper at identity. A model holds one synthesizer's LoRA at a time: attaching
    replaces the previous one (a setup step, never done while requests run)."""
    _check_rank(lm, config)
    detach(lm.model)
    lora = LoRA(lm.model, config.targets, config.rank, config.alpha) if config.lora else None
    mapper = None
    if config.mapper is not None:
        mapper = build_mapper(config.mapper, lm.config, rope_of(lm.model)).to(lm.device)
    return Synthesizer(config, mapper, lora, identity(lm))


def _tensors(synthesizer: Synthesizer) -> dict[str, torch.Tensor]:
    config, tensors = synthesizer.config, {}
    if (synthesizer.lora is not None) != config.lora or (synthesizer.mapper is not None) != (config.mapper is not None):
        raise ValueError("the synthesizer's parts differ from its config (LoRA and mapper must be as configured)")
    if synthesizer.lora is not None:
        tensors.update({f"lora.{k}": v for k, v in synthesizer.lora.state_dict().items()})
    if synthesizer.mapper is not None:
        tensors.update({f"mapper.{k}": v for k, v in synthesizer.mapper.state_dict().items()})
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save non-finite weights (NaN or inf) in {len(bad)} tensor(s): "
                         f"{', '.join(bad[:3])}")
    return tensors


def save(synthesizer: Synthesizer, lm: LM, path: Path) -> Path:
    """Write the checkpoint folder: the weights, then synthesizer.json with their sha256 (each file
    atomically; a kill between the two leaves a folder that `load` refuses, never a silent mix)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = save_tensors(_tensors(synthesizer))
    meta = {"format": FORMAT, "version": VERSION, "base": synthesizer.base, "adapter": asdict(synthesizer.config),
            "recipe": synthesizer.recipe, "sha256": {WEIGHTS: hashlib.sha256(data).hexdigest()}}
    atomic_write(path / WEIGHTS, lambda p: p.write_bytes(data))
    write_json(path / CONFIG, meta)
    return path


def derive(synthesizer: Synthesizer, *, mapper: bool = True, layout: str | None = None) -> Synthesizer:
    """The same trained parts with the mapper dropped (`mapper=False`) and/or another default `layout`;
    the recipe records what was derived from which weights. The LoRA is shared, not copied."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    config = replace(synthesizer.config, mapper=synthesizer.config.mapper if mapper else None,
                     layout=layout or synthesizer.config.layout)
    if config.mapper is None and not config.lora:
        raise ValueError("a synthesizer without its mapper needs a LoRA: this one has none")
    source = synthesizer.recipe.get("derived", {}).get("from") or (
        json.loads((synthesizer.path / CONFIG).read_text()).get("sha256", {}).get(WEIGHTS)
        if synthesizer.path is not None and (synthesizer.path / CONFIG).is_file() else None)
    derived = {"from": source, "mapper": "kept" if config.mapper is not None else "dropped", "layout": config.layout}
    return Synthesizer(config, synthesizer.mapper if mapper else None, synthesizer.lora, synthesizer.base,
                       {**synthesizer.recipe, "derived": derived})


def read_file(path: Path, what: str) -> bytes:
    """The bytes of `path`; an unreadable file is named as such (not as corrupt)."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from None


def _read_meta(path: Path) -> tuple[dict, AdapterConfig]:
    file = path / CONFIG
    try:
        meta = json.loads(read_file(file, "checkpoint config"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"checkpoint config {file} is corrupt: not JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{file} is not a {FORMAT} file")
    version = meta.get("version")
    if version not in (1, VERSION):
        raise ValueError(f"checkpoint config {file} has version {version!r}; this parsyn reads versions 1-{VERSION}")
    try:
        if "adapter" not in meta or "base" not in meta:
            raise ValueError("it lacks 'adapter' or 'base'")
        config = AdapterConfig.from_dict(meta["adapter"])
        base = meta["base"]
        if not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in ("config_hash",
                                                                                             "tokenizer_hash")):
            raise ValueError("'base' must hold the base model's config_hash and tokenizer_hash as strings")
        if not isinstance(meta.get("recipe", {}), dict):
            raise ValueError("'recipe' must be a JSON object")
        digest = meta.get("sha256", {}).get(WEIGHTS) if isinstance(meta.get("sha256"), dict) else None
        if version >= 2 and not (isinstance(digest, str) and len(digest) == 64):
            raise ValueError(f"'sha256' must record the sha256 of {WEIGHTS} (version {version})")
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint config {file}: {error}") from None
    return meta, config


def _read_weights(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS
    data = read_file(file, "checkpoint weights")
    expected = meta.get("sha256", {}).get(WEIGHTS) if meta["version"] >= 2 else None
    if expected is None:
        log.warning("checkpoint %s (version 1) records no checksum: its weights are not verified", path)
    elif hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"checkpoint weights {file} are corrupt or truncated: their sha256 differs from the "
                         f"one {CONFIG} records")
    try:
        return load_tensors(data)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"checkpoint weights {file} are corrupt or truncated: {error}") from None


def _expected(lm: LM, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint with `config` holds for `lm` (the model is not changed)."""
    shapes = {}
    for name, (inp, out) in _check_rank(lm, config).items():
        shapes[f"lora.{name}.lora_A.weight"] = (config.rank, inp)
        shapes[f"lora.{name}.lora_B.weight"] = (out, config.rank)
    if config.mapper is not None:
        mapper = build_mapper(config.mapper, lm.config, rope_of(lm.model))
        shapes.update({f"mapper.{k}": tuple(v.shape) for k, v in mapper.state_dict().items()})
    return shapes


def _check_tensors(file: Path, config: AdapterConfig, tensors: dict, shapes: dict) -> None:
    said = f"{CONFIG} says lora {str(config.lora).lower()}, mapper {config.mapper.kind if config.mapper else 'null'}"
    extra, missing = sorted(set(tensors) - set(shapes)), sorted(set(shapes) - set(tensors))
    if extra:
        raise ValueError(f"checkpoint weights {file} hold {len(extra)} tensor(s) its config does not use ({said}): "
                         f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    if missing:
        raise ValueError(f"checkpoint weights {file} lack {len(missing)} tensor(s) its config needs ({said}): "
                         f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    for name, shape in shapes.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"checkpoint weights {file}: tensor {name} has shape {tuple(tensor.shape)}, but its "
                             f"config (LoRA rank {config.rank}) on this model needs {shape}")
        if not tensor.is_floating_point():
            raise ValueError(f"checkpoint weights {file}: tensor {name} is {tensor.dtype}, not floating point")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"checkpoint weights {file}: tensor {name} holds {bad} non-finite value(s) (NaN or inf)")


def _check_base(path: Path, base: dict, lm: LM) -> None:
    mine = identity(lm)
    if (base.get("config_hash"), base.get("tokenizer_hash")) != (mine["config_hash"], mine["tokenizer_hash"]):
        raise ValueError(
            f"checkpoint {path} was trained for base model '{base.get('name')}' (config {base.get('config_hash')}, "
            f"tokenizer {base.get('tokenizer_hash')}); the loaded model is '{mine['name']}' "
            f"(config {mine['config_hash']}, tokenizer {mine['tokenizer_hash']})"
        )


def load(lm: LM, path: Path) -> Synthesizer:
    """Load a checkpoint onto `lm`; ValueError naming the file when it is missing, unreadable, corrupt,
    inconsistent with its config, or made for another base model (the model is then left as it was)."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ValueError(f"not a parsyn checkpoint (needs {CONFIG} and {WEIGHTS}): {path}")
    meta, config = _read_meta(path)
    _check_base(path, meta["base"], lm)
    tensors = _read_weights(path, meta)
    try:
        shapes = _expected(lm, config)
    except ValueError as error:  # the config's LoRA does not fit this model's layers
        raise ValueError(f"checkpoint config {path / CONFIG}: {error}") from None
    _check_tensors(path / WEIGHTS, config, tensors, shapes)
    synthesizer = attach(lm, config)
    synthesizer.base, synthesizer.recipe, synthesizer.path = meta["base"], meta.get("recipe", {}), path
    with torch.no_grad():
        if synthesizer.lora is not None:
            synthesizer.lora.load_state_dict({k[5:]: v.to(lm.dtype) for k, v in tensors.items() if k[:5] == "lora."})
        if synthesizer.mapper is not None:
            synthesizer.mapper.load_state_dict({k[7:]: v for k, v in tensors.items() if k[:7] == "mapper."})
    if synthesizer.lora is not None:
        synthesizer.lora.merge()  # a loaded synthesizer is for synthesis: its first one pays no set-up
    return synthesizer


def packaged() -> dict[Path, dict]:
    """The checkpoints that ship with parsyn: folder -> the `base` it was trained on (name and hashes)."""
    found = {}
    for config in sorted(PACKAGED.glob(f"*/{CONFIG}")):
        found[config.parent] = json.loads(config.read_text()).get("base", {})
    return found


def resolve(lm: LM, choice: str | None) -> Synthesizer | None:
    """`none`/None: no adapter; `auto`: the packaged checkpoint made for this model, if one is; else a path."""
    if choice in (None, "none"):
        return None
    if choice == "auto":
        mine = identity(lm)
        for folder, base in packaged().items():
            if (base.get("config_hash"), base.get("tokenizer_hash")) == (mine["config_hash"], mine["tokenizer_hash"]):
                return load(lm, folder)
        return None
    return load(lm, Path(choice))
