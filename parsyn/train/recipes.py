"""Named training recipes: JSON files in `parsyn/configs/` (the packaged checkpoints' recipes first)
holding a `TrainConfig` under "train". `parsyn train --recipe NAME` runs one; flags given beside it
override its fields."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..mapper import MapperConfig
from .loop import TrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def load(name: str) -> TrainConfig:
    """The recipe named `name` (a file in parsyn/configs) or stored at the path `name`."""
    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        path = Path(name)
    if not path.is_file():
        raise ValueError(f"unknown recipe '{name}' "
                         f"(named recipes: {', '.join(names()) or 'none'}; or give a JSON file)")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text())["train"])
    except (KeyError, TypeError, ValueError) as error:  # ValueError: bad JSON or a field out of range
        raise ValueError(f"recipe {path} is not a training recipe: {error}") from None


def override(config: TrainConfig, **given) -> TrainConfig:
    """`config` with the given (non-None) settings replaced: training fields by name; kl, ce, value_weight
    in the loss; lora, rank (alpha = 2 x rank), layout, recompute in the adapter; mapper by kind or "none"."""
    given = {k: v for k, v in given.items() if v is not None}
    loss = dataclasses.replace(config.loss, **{k: given.pop(k) for k in ("kl", "ce", "value_weight") if k in given})
    adapter = config.adapter
    if "mapper" in given:
        kind = given.pop("mapper")
        keep = adapter.mapper if adapter.mapper is not None and adapter.mapper.kind == kind else None
        adapter = dataclasses.replace(adapter, mapper=None if kind == "none" else keep or MapperConfig(kind=kind))
    if "rank" in given:
        given["alpha"] = 2 * given["rank"]
    parts = {k: given.pop(k) for k in ("lora", "rank", "alpha", "layout", "recompute") if k in given}
    adapter = dataclasses.replace(adapter, **parts)
    if "layouts" in given:
        given["layouts"] = tuple(x.strip() for x in given["layouts"].split(",") if x.strip())
    return dataclasses.replace(config, **given, loss=loss, adapter=adapter)


