"""Checkpoint loads: a checkpoint is trusted for nothing; each refusal names the file and leaves the model as it was."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from conftest import random_synthesizer, tiny_lm
from safetensors.torch import load_file, save_file

from parsyn import adapter as A
from parsyn.mapper import MapperConfig

# 3 and 6. a checkpoint load trusts nothing and names the file --------------------------------------------------------


@pytest.fixture
def saved(tmp_path, tokenizer):
    lm = tiny_lm("llama", tokenizer)
    trained = random_synthesizer(lm, A.AdapterConfig(rank=4, alpha=8, mapper=MapperConfig(kind="affine")))
    return A.save(trained, lm, tmp_path / "ckpt")


def edit_config(path, **changes):
    meta = json.loads((path / A.CONFIG).read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            meta[section][name] = value
        else:
            meta[section] = value
    (path / A.CONFIG).write_text(json.dumps(meta))


def rewrite_weights(path, change):
    tensors = load_file(path / A.WEIGHTS)
    change(tensors)
    save_file(tensors, path / A.WEIGHTS)
    edit_config(path, sha256={A.WEIGHTS: hashlib.sha256((path / A.WEIGHTS).read_bytes()).hexdigest()})


def test_checkpoints_record_the_sha256_of_their_weights(saved, tokenizer):
    meta = json.loads((saved / A.CONFIG).read_text())
    digest = hashlib.sha256((saved / A.WEIGHTS).read_bytes()).hexdigest()
    assert meta["version"] == 2 and meta["sha256"] == {A.WEIGHTS: digest}
    data = bytearray((saved / A.WEIGHTS).read_bytes())
    data[-1] ^= 1  # same length, one bit flipped in the last tensor
    (saved / A.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"weights {saved / A.WEIGHTS} are corrupt or truncated: their sha256"):
        A.load(tiny_lm("llama", tokenizer), saved)


@pytest.mark.parametrize("changes, message", [
    ({"adapter__mapper": None}, r"hold 4 tensor\(s\) its config does not use \(synthesizer.json says lora true, "
                                r"mapper null\): mapper\."),
    ({"adapter__lora": False}, r"hold 16 tensor\(s\) its config does not use \(synthesizer.json says lora false"),
    ({"adapter__mapper": {"kind": "tagged"}}, r"hold .* not use|lack .* needs"),
    ({"adapter__rank": 8, "adapter__alpha": 16}, r"lora_A.weight has shape \(4, 64\), but its config \(LoRA rank 8\)"),
    ({"adapter__rank": "sixteen"}, r"AdapterConfig.rank must be an integer >= 1, got 'sixteen'"),
    ({"adapter__targets": "q_proj"}, r"AdapterConfig.targets must be a non-empty list"),
    ({"adapter__mapper": {"kind": "affine", "hidden": 32.5}}, r"MapperConfig.hidden must be an integer"),
    ({"adapter__extra": 1}, r"AdapterConfig has unknown field\(s\) 'extra'"),
    ({"base": "tiny"}, r"'base' must hold"),
    ({"version": 9}, r"has version 9"),
])
def test_a_config_that_disagrees_with_its_weights_is_refused(saved, tokenizer, changes, message):
    edit_config(saved, **changes)
    with pytest.raises(ValueError, match=message) as error:
        A.load(tiny_lm("llama", tokenizer), saved)
    assert str(saved) in str(error.value)


def test_missing_and_non_finite_tensors_are_refused_and_the_model_is_left_alone(saved, tokenizer):
    lm = tiny_lm("llama", tokenizer)
    before = A.attach(lm, A.AdapterConfig(rank=2, alpha=4))
    first = next(k for k in load_file(saved / A.WEIGHTS) if k.startswith("lora."))
    rewrite_weights(saved, lambda t: t.pop(first))
    with pytest.raises(ValueError, match=rf"{saved / A.WEIGHTS} lack 1 tensor\(s\) its config needs .*{first}"):
        A.load(lm, saved)
    rewrite_weights(saved, lambda t: t.update({first: torch.zeros(4, 64)}))
    A.load(tiny_lm("llama", tokenizer), saved)  # whole again

    def poison(tensors):
        tensors[first][0, 0] = math.nan

    rewrite_weights(saved, poison)
    with pytest.raises(ValueError, match=rf"{saved / A.WEIGHTS}: tensor {first} holds 1 non-finite value"):
        A.load(lm, saved)
    assert before.lora.layers and all(layer.lora_A.out_features == 2 for layer in before.lora.layers.values())
    assert all(lm.model.get_submodule(name) is layer for name, layer in before.lora.layers.items())


def test_an_unreadable_weights_file_is_named_unreadable_not_corrupt(saved, tokenizer, monkeypatch):
    real = A.Path.read_bytes

    def denied(self):
        if self.name == A.WEIGHTS:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(A.Path, "read_bytes", denied)
    with pytest.raises(ValueError, match=rf"cannot read checkpoint weights {saved / A.WEIGHTS}: Permission denied$"):
        A.load(tiny_lm("llama", tokenizer), saved)


def test_a_version_1_checkpoint_without_a_checksum_still_loads(saved, tokenizer):
    meta = json.loads((saved / A.CONFIG).read_text())
    del meta["sha256"]
    (saved / A.CONFIG).write_text(json.dumps({**meta, "version": 1}))
    assert A.load(tiny_lm("llama", tokenizer), saved).mapper is not None
    (saved / A.CONFIG).write_text(json.dumps({**meta, "version": 2}))  # version 2 must carry it
    with pytest.raises(ValueError, match=r"'sha256' must record"):
        A.load(tiny_lm("llama", tokenizer), saved)


def test_non_finite_weights_are_never_saved(tmp_path, tokenizer):
    lm = tiny_lm("llama", tokenizer)
    trained = A.attach(lm, A.AdapterConfig(rank=2, alpha=4))
    with torch.no_grad():
        trained.lora.parameters()[1][0, 0] = math.inf
    with pytest.raises(ValueError, match="refusing to save non-finite"):
        A.save(trained, lm, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / A.WEIGHTS).exists()


def test_a_derived_checkpoint_drops_the_mapper_and_synthesizes_as_the_lora_alone(saved, tokenizer):
    from dataclasses import replace

    from parsyn.sampling import SamplingParams
    from parsyn.synthesis import synthesize
    from parsyn.workers import from_texts

    lm = tiny_lm("llama", tokenizer)
    whole = A.load(lm, saved)
    f = from_texts(lm, "Where is the meeting?", ["Room 204.", "On Thursday."])
    want = synthesize(lm, f, synthesizer=replace(whole, mapper=None), layout="sequential", sampling=SamplingParams(6))
    derived = A.save(A.derive(whole, mapper=False, layout="sequential"), lm, saved.parent / "derived")
    again = A.load(lm, derived)
    assert again.mapper is None and again.layout == "sequential" and again.config.lora
    assert all(layer._merge for layer in again.lora.layers.values())  # merged at load, not at the first synthesis
    sha = json.loads((saved / A.CONFIG).read_text())["sha256"][A.WEIGHTS]
    assert again.recipe["derived"] == {"from": sha, "mapper": "dropped", "layout": "sequential"}
    assert set(load_file(derived / A.WEIGHTS)) == {k for k in load_file(saved / A.WEIGHTS) if k.startswith("lora.")}
    got = synthesize(lm, f, synthesizer=again, sampling=SamplingParams(6))  # its own layout by default
    assert got.token_ids == want.token_ids and got.layout == "sequential"
    with pytest.raises(ValueError, match="unknown layout"):
        A.derive(whole, layout="diagonal")
