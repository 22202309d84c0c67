"""Mappers, losses, data generation, the trainer, checkpoints — on tiny random models and the real one."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import random_synthesizer, tiny_lm
from safetensors.torch import load_file

from parsyn import adapter as A
from parsyn.compose import compose
from parsyn.mapper import MapperConfig, build_mapper
from parsyn.rope import rope_of, rotate
from parsyn.sampling import SamplingParams
from parsyn.synthesis import prepare, synthesize
from parsyn.train.data import DataConfig, generate, read_items, specs
from parsyn.train.loop import TrainConfig, student_logits, train
from parsyn.train.loss import LossConfig, distill_loss
from parsyn.workers import fork, from_texts

QUESTION = "Which city does Vera live in?"
TEXTS = ["Vera lives in Oslo. Tom has a pet cat.", "Ann lives in Lima."]
SMALL = DataConfig(items=10, batch=5, answer_tokens=6, topk=8, worker_tokens=6,
                   mix=(("facts", 0.5), ("evidence", 0.2), ("chat", 0.1), ("workers", 0.2)))


@pytest.fixture
def lm(tokenizer):
    return tiny_lm("llama", tokenizer)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("data")
    return generate(tiny_lm("llama", tokenizer), folder, SMALL)


@pytest.mark.parametrize("kind", ["affine", "tagged"])
def test_mappers_start_as_the_identity_and_can_learn(lm, kind):
    f = from_texts(lm, QUESTION, TEXTS)
    mapper = build_mapper(MapperConfig(kind=kind), lm.config, rope_of(lm.model))
    plain = compose(f.prefix, [b.kv for b in f.branches], rope_of(lm.model), layout="parallel")
    mapped = compose(f.prefix, [b.kv for b in f.branches], rope_of(lm.model), layout="parallel", mapper=mapper)
    for a, b in zip(plain.kv.keys + plain.kv.values, mapped.kv.keys + mapped.kv.values):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    out = mapper(f.branches[0].kv, 0, 2)
    sum(k.sum() for k in out.keys + out.values).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mapper.parameters())
    if kind == "affine":
        assert sum(p.numel() for p in mapper.parameters()) == 260  # the paper's 3-32-4 MLP


def test_tagged_mapper_tells_branches_apart(lm):
    mapper = build_mapper(MapperConfig(kind="tagged"), lm.config, rope_of(lm.model))
    with torch.no_grad():
        mapper.value_tags.normal_()
    kv = from_texts(lm, QUESTION, TEXTS).branches[0].kv
    first, second = mapper(kv, 0, 2), mapper(kv, 1, 2)
    assert not torch.allclose(first.values[0], second.values[0])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tagged_key_tags_are_keys_at_each_tokens_position(family, tokenizer):
    """One rotation serves all layers when they share frequencies; Gemma 3's local and global layers
    do not, and each layer's tag must still be rotated with its own."""
    lm = tiny_lm(family, tokenizer)
    rope = rope_of(lm.model)
    mapper = build_mapper(MapperConfig(kind="tagged"), lm.config, rope)
    with torch.no_grad():
        mapper.key_tags.normal_()
    positions = torch.arange(5, 12)
    got = mapper._rotated_key_tags(1, positions)
    for i, freq in enumerate(rope.inv_freq):
        tag = mapper.key_tags[1, i][None, :, None, :].expand(1, -1, positions.numel(), -1)
        torch.testing.assert_close(got[i], rotate(tag, freq, torch.zeros_like(positions), positions), atol=1e-6, rtol=0)
    assert mapper.shared_freq == (family == "llama")


def test_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    teacher = torch.log_softmax(logits, -1).topk(8, -1)
    answer = logits.argmax(-1)
    mask = torch.tensor([0, 1, 0])
    same, stats = distill_loss(logits, answer, teacher.indices, teacher.values, mask, True, LossConfig())
    assert same.item() == pytest.approx(0.0, abs=1e-6) and stats["ce"] > 0
    worse, _ = distill_loss(torch.randn(3, 50, generator=g), answer, teacher.indices, teacher.values, mask, True,
                            LossConfig())
    ce_only, _ = distill_loss(logits, answer, teacher.indices, teacher.values, mask, None,
                              LossConfig(kl=0, ce=1, value_weight=1))
    assert worse > 0.01 and ce_only.item() == pytest.approx(stats["ce"], rel=1e-5)
    with pytest.raises(ValueError, match="kl"):
        LossConfig(kl=0, ce=0)


def test_specs_are_deterministic_and_keep_evaluation_items_out():
    a, b = specs(DataConfig(items=60, seed=3)), specs(DataConfig(items=60, seed=3))
    assert a == b and len({s.id for s in a}) == 60
    assert {s.kind for s in a} == {"facts", "evidence", "icl", "chat", "workers"}
    from parsyn import datasets as D
    from parsyn.probe import TRAIN_SEEDS

    eval_ids = {f"squad-{r['id']}" for r in D.squad("eval")} | {f"boolq-{r['id']}" for r in D.boolq("eval")}
    assert not eval_ids & {s.id for s in specs(DataConfig(items=400))}
    assert all(int(s.id.split("-")[1]) in TRAIN_SEEDS for s in a if s.kind == "facts")


def test_generated_items_hold_token_ids_and_teacher_distributions(tiny_data, tokenizer):
    items = read_items(tiny_data)
    assert len(items) == SMALL.items and len({i["id"] for i in items}) == SMALL.items
    for item in items:
        assert len(item["topk_ids"]) == len(item["answer_ids"]) == len(item["value_mask"]) and item["answer_ids"]
        assert all(len(k) == SMALL.topk for k in item["topk_ids"])
        # the teacher's greedy token is the top of its own distribution
        assert all(k[0] == t for k, t in zip(item["topk_ids"], item["answer_ids"]))
    assert any(i["kind"] == "workers" and len(i["branch_ids"]) >= 2 for i in items)


def test_killed_generation_resumes_without_duplicates(tmp_path, tokenizer, tiny_data):
    lines = tiny_data.read_text().splitlines(keepends=True)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "manifest.json").write_text((tiny_data.parent / "manifest.json").read_text())
    (folder / "items.jsonl").write_text("".join(lines[:4]) + lines[4][:30])  # killed mid-line
    path = generate(tiny_lm("llama", tokenizer), folder, SMALL)
    ids = [i["id"] for i in read_items(path)]
    assert sorted(ids) == sorted(i["id"] for i in read_items(tiny_data)) and len(ids) == len(set(ids))


def test_malformed_lines_are_named(tmp_path, tiny_data):
    good = tiny_data.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([good[0], "{not json", good[1], '{"id": "x"}', good[2]]) + "\n")
    with pytest.raises(ValueError, match=r"2 malformed line\(s\): 2 .*; 4 \(missing"):
        read_items(bad)
    assert len(read_items(bad, on_error="skip")) == 3


def test_training_checkpoints_and_a_stopped_run_resumes_exactly(tmp_path, tiny_data, tokenizer):
    adapter = A.AdapterConfig(rank=4, alpha=8, mapper=MapperConfig(kind="tagged"), recompute=2)
    config = TrainConfig(steps=4, checkpoint_every=2, log_every=1, holdout_percent=0, lr=1e-2, adapter=adapter)
    whole = train(tiny_lm("llama", tokenizer), tiny_data, tmp_path / "whole", config, show_progress=False)
    run = tmp_path / "stopped"
    train(tiny_lm("llama", tokenizer), tiny_data, run, config, show_progress=False, stop_after=2)
    assert torch.load(run / "checkpoint" / "trainer.pt", weights_only=True)["step"] == 2  # inside the checkpoint
    lm = tiny_lm("llama", tokenizer)  # a fresh process: everything comes from the run folder
    resumed = train(lm, tiny_data, run, config, show_progress=False)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    a = A.load(tiny_lm("llama", tokenizer), tmp_path / "whole" / "checkpoint")
    b = A.load(tiny_lm("llama", tokenizer), resumed.path)
    for x, y in zip(a.mapper.parameters(), b.mapper.parameters()):  # bitwise: resume replays the same steps
        assert torch.equal(x, y)
    assert not torch.equal(a.mapper.value_tags, torch.zeros_like(a.mapper.value_tags))  # it trained
    lora_a, lora_b = (load_file(p / "checkpoint" / A.WEIGHTS) for p in (tmp_path / "whole", run))
    ups = [k for k in lora_a if "lora_B" in k]
    assert ups and all(lora_a[k].abs().sum() > 0 for k in ups)  # LoRA B starts at zero: the LoRA trained too
    for k in lora_a:
        assert torch.equal(lora_a[k], lora_b[k]), k
    with pytest.raises(ValueError, match="steps"):
        train(lm, tiny_data, run, dataclasses.replace(config, steps=6), show_progress=False)
    assert b.config == adapter and b.recipe["train"]["steps"] == 4 and whole.path.name == "checkpoint"


def test_checkpoint_roundtrip_and_refusals(tmp_path, tokenizer):
    lm = tiny_lm("llama", tokenizer)
    trained = random_synthesizer(lm, A.AdapterConfig(rank=4, alpha=8, mapper=MapperConfig(kind="affine")))
    path = A.save(trained, lm, tmp_path / "ckpt")
    f = from_texts(lm, QUESTION, TEXTS)
    before = prepare(lm, f, synthesizer=trained).logits
    other = tiny_lm("llama", tokenizer)
    loaded = A.load(other, path)
    torch.testing.assert_close(prepare(other, f, synthesizer=loaded).logits, before, atol=1e-5, rtol=0)
    assert not torch.allclose(prepare(other, f).logits, before, atol=1e-3)  # the adapter matters
    with pytest.raises(ValueError, match="trained for base model"):
        A.load(tiny_lm("qwen3", tokenizer), path)
    weights = (path / A.WEIGHTS).read_bytes()
    (path / A.WEIGHTS).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        A.load(lm, path)
    (path / A.CONFIG).write_text("{")
    with pytest.raises(ValueError, match="corrupt"):
        A.load(lm, path)
    with pytest.raises(ValueError, match="not a parsyn checkpoint"):
        A.load(lm, tmp_path)


def test_workers_and_the_text_route_never_use_the_adapter(tokenizer):
    lm = tiny_lm("qwen3", tokenizer)
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, seed=2)
    before = [b.token_ids for b in fork(lm, QUESTION, workers=2, sampling=sampling).branches]
    f = from_texts(lm, QUESTION, TEXTS)
    text_before = prepare(lm, f, route="text").logits
    trained = A.attach(lm, A.AdapterConfig(rank=4, alpha=8))
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_(0, 0.1)
    assert [b.token_ids for b in fork(lm, QUESTION, workers=2, sampling=sampling).branches] == before
    torch.testing.assert_close(prepare(lm, f, route="text", synthesizer=trained).logits, text_before, atol=0, rtol=0)
    raw = prepare(lm, f).logits
    assert (prepare(lm, f, synthesizer=trained).logits - raw).abs().max() > 1e-3  # the cache route does use it


def test_student_logits_match_the_cache_route(lm):
    """Teacher forcing in training runs exactly the route that inference runs."""
    f = from_texts(lm, QUESTION, TEXTS)
    greedy = synthesize(lm, f, layout="sequential", sampling=SamplingParams(5))
    from parsyn.synthesis import prompt_tokens

    item = {"question": QUESTION, "prefix_ids": list(f.prefix_ids),
            "branch_ids": [list(b.token_ids) for b in f.branches],
            "prompt_ids": prompt_tokens(lm, f), "answer_ids": list(greedy.token_ids)}
    with torch.no_grad():
        logits = student_logits(lm, None, item, "sequential")
    assert logits.argmax(-1).tolist() == list(greedy.token_ids)


@pytest.mark.slow
def test_two_process_data_parallel_training(tmp_path, tiny_data, tokenizer):
    folder = tmp_path / "tiny-model"
    tiny_lm("llama", tokenizer).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run = tmp_path / "ddp"
    # accelerate launches through torch.distributed.run; without GPUs the Accelerator runs DDP over gloo on CPU
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "parsyn.cli", "train", str(tiny_data), str(run),
               "--model", str(folder), "--steps", "3", "--checkpoint-every", "3", "--rank", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 3 and logged[-1]["world_size"] == 2
    assert (run / "checkpoint" / A.WEIGHTS).is_file()


@pytest.mark.slow
def test_smoke_training_on_the_default_model(tmp_path, default_lm):
    """A few real steps on the embedded model: data, training and a checkpoint the cache route loads."""
    config = DataConfig(items=4, batch=4, answer_tokens=8, topk=16, worker_tokens=8, mix=(("facts", 1.0),))
    data = generate(default_lm, tmp_path / "data", config)
    trained = train(default_lm, data, tmp_path / "run", TrainConfig(steps=3, holdout_percent=0, checkpoint_every=3),
                    show_progress=False)
    f = from_texts(default_lm, QUESTION, TEXTS)
    reloaded = A.load(default_lm, trained.path)
    moved = prepare(default_lm, f, synthesizer=reloaded).logits
    assert torch.isfinite(moved).all() and (moved - prepare(default_lm, f).logits).abs().max() > 1e-4  # it trained
    A.attach(default_lm, A.AdapterConfig(lora=False, mapper=MapperConfig()))  # leave the shared model clean


@pytest.mark.slow
def test_packaged_checkpoint_loads_for_the_embedded_model_only(tokenizer):
    """`auto` finds the committed checkpoint for the default model, which changes the cache route only;
    on any other model `auto` means no adapter."""
    from parsyn import model as M

    lm = M.load()  # a model of its own: attaching LoRA must not touch the session-wide one
    f = from_texts(lm, QUESTION, TEXTS)
    raw = prepare(lm, f).logits
    trained = A.resolve(lm, "auto")
    assert trained is not None and trained.config.mapper is not None and trained.config.mapper.kind == "tagged"
    assert trained.recipe["train"]["steps"] >= 1000
    ups = [v for k, v in load_file(trained.path / A.WEIGHTS).items() if "lora_B" in k]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # the LoRA trained (B starts at zero)
    assert not torch.allclose(prepare(lm, f, synthesizer=trained).logits, raw, atol=1e-3)
    torch.testing.assert_close(prepare(lm, f).logits, raw, atol=0, rtol=0)  # switched off outside the route
    assert A.resolve(tiny_lm("qwen3", tokenizer), "auto") is None


def test_fidelity_rows_for_raw_and_trained_parts(tiny_data, tokenizer):
    from parsyn.eval.fidelity import ablations, evaluate, table

    lm = tiny_lm("llama", tokenizer)
    items = read_items(tiny_data)[:3]
    trained = A.attach(lm, A.AdapterConfig(rank=4, alpha=8, mapper=MapperConfig(kind="tagged")))
    variants = ablations(trained, ["parallel"])
    assert [v.name for v in variants] == ["raw parallel", "trained parallel", "mapper only parallel",
                                          "LoRA only parallel"]
    rows = evaluate(lm, variants, items, probe_size=3, answer_tokens=4, probe_tokens=4)
    assert [r["variant"] for r in rows] == ["text"] + [v.name for v in variants]
    for r in rows[1:]:
        assert 0 <= r["agreement"] <= 1 and 0 <= r["token_agreement"] <= 1 and r["kl"] >= 0 and r["kl_value"] >= 0
    # an untouched adapter (LoRA B = 0, identity mapper) is the raw route exactly
    assert (rows[1]["kl"] == pytest.approx(rows[2]["kl"], abs=1e-6)
            and rows[1]["token_agreement"] == rows[2]["token_agreement"])
    assert table(rows).count("\n") == len(rows) + 1


def test_the_packaged_recipe_is_a_named_recipe_and_flags_override_it():
    from parsyn.train import recipes

    config = recipes.load("smollm2-135m-instruct")
    packaged = json.loads((A.DEFAULT_CHECKPOINT / A.CONFIG).read_text())["recipe"]["train"]
    assert json.loads(json.dumps(config.to_dict())) == packaged  # the file is what trained the packaged checkpoint
    assert config.adapter.mapper.kind == "tagged" and config.steps == 2000
    tweaked = recipes.override(config, steps=10, mapper="affine", rank=4, kl=0.5, layouts="parallel", seed=None)
    assert ((tweaked.steps, tweaked.adapter.mapper.kind, tweaked.adapter.rank, tweaked.adapter.alpha)
            == (10, "affine", 4, 8))
    assert (tweaked.loss.kl, tweaked.layouts, tweaked.lr, tweaked.seed) == (0.5, ("parallel",), config.lr, config.seed)
    with pytest.raises(ValueError, match="unknown recipe 'nosuch'"):
        recipes.load("nosuch")



def test_the_held_out_curve_is_logged_at_each_checkpoint_and_changes_nothing(tmp_path, tiny_data, tokenizer,
                                                                           monkeypatch):
    from parsyn.train import loop
    from parsyn.train.data import read_items

    config = TrainConfig(steps=4, checkpoint_every=2, log_every=1, holdout_percent=30, lr=1e-2,
                         adapter=A.AdapterConfig(rank=2, alpha=4, mapper=MapperConfig(kind="affine")))
    held = loop.split(read_items(tiny_data), 30)[1]
    assert held, "the test needs held-out items"
    train(tiny_lm("llama", tokenizer), tiny_data, tmp_path / "with", config, show_progress=False)
    curve = [json.loads(line) for line in (tmp_path / "with" / "held_out.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [2, 4] and all(c["held_out_items"] == len(held) for c in curve)
    assert all(math.isfinite(c["held_out_loss"]) for c in curve) and curve[0] != curve[1]  # it follows training
    stopped = tmp_path / "stopped"  # a resumed run draws the same curve, each point once
    train(tiny_lm("llama", tokenizer), tiny_data, stopped, config, show_progress=False, stop_after=2)
    train(tiny_lm("llama", tokenizer), tiny_data, stopped, config, show_progress=False)
    assert (stopped / "held_out.jsonl").read_text() == (tmp_path / "with" / "held_out.jsonl").read_text()
    monkeypatch.setattr(loop, "held_out_loss", lambda *args: {})  # the same run without the curve's forwards
    train(tiny_lm("llama", tokenizer), tiny_data, tmp_path / "without", config, show_progress=False)
    a, b = (load_file(tmp_path / name / "checkpoint" / A.WEIGHTS) for name in ("with", "without"))
    assert all(torch.equal(a[k], b[k]) for k in a)
