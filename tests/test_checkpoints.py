"""Checkpoints and runs under hostile conditions: kills at any moment, tampered or mismatched files,
values that cannot work. What is refused is refused with the file and the reason; what resumes
resumes bitwise."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_lm
from safetensors.torch import load_file

from parsyn import adapter as A
from parsyn import files as F
from parsyn.mapper import MapperConfig
from parsyn.train import loop as L
from parsyn.train.data import DataConfig, generate
from parsyn.train.loop import TrainConfig, train
from parsyn.train.loss import LossConfig

SMALL = DataConfig(items=6, batch=6, answer_tokens=4, topk=8, worker_tokens=4,
                   mix=(("facts", 0.5), ("evidence", 0.5)))
ADAPTER = A.AdapterConfig(rank=4, alpha=8, mapper=MapperConfig(kind="tagged"))
CONFIG = TrainConfig(steps=4, checkpoint_every=2, log_every=1, holdout_percent=0, lr=1e-2, adapter=ADAPTER)


class Killed(BaseException):
    """What a kill looks like from inside: nothing after it runs (no `except Exception` catches it)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer):
    return generate(tiny_lm("llama", tokenizer), tmp_path_factory.mktemp("data"), SMALL)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data, tokenizer):
    """An uninterrupted run: what every interrupted one must end as, bit for bit."""
    run = tmp_path_factory.mktemp("whole")
    train(tiny_lm("llama", tokenizer), data, run, CONFIG, show_progress=False)
    return run


def run_train(tokenizer, data, run, config=CONFIG, **kw):
    return train(tiny_lm("llama", tokenizer), data, run, config, show_progress=False, **kw)


def assert_same_result(run, whole):
    a, b = (load_file(r / "checkpoint" / A.WEIGHTS) for r in (run, whole))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, CONFIG.steps + 1))


def state(run) -> dict:
    return json.loads((run / "checkpoint" / L.STATE).read_text())


# 1. a checkpoint is one unit ---------------------------------------------------------------------------------------


def test_a_kill_between_weights_and_optimizer_state_keeps_the_previous_checkpoint(tmp_path, data, whole, tokenizer,
                                                                                  monkeypatch):
    """The step-4 weights are written, then the process dies before the step-4 optimizer state: the run
    must resume from the complete step-2 checkpoint, not from step-4 weights with the step-2 optimizer."""
    real, calls = torch.save, []

    def dying_save(obj, f, *args, **kw):
        if "trainer.pt" in str(f):
            calls.append(f)
            if len(calls) == 2:
                raise Killed
        return real(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        run_train(tokenizer, data, run)
    monkeypatch.setattr(torch, "save", real)
    run_train(tokenizer, data, run)
    assert_same_result(run, whole)


def names(folder):
    """What a folder holds, less the lock files that serialize writers."""
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".lock")


def test_a_kill_while_the_new_checkpoint_replaces_the_old_falls_back_to_the_old(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint"
    with F.atomic_folder(target) as tmp:
        (tmp / "a").write_text("old")
    real, calls = F.os.replace, []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old folder has moved aside, the new one is not yet in place
            raise Killed
        return real(src, dst)

    monkeypatch.setattr(F.os, "replace", dying_replace)
    with pytest.raises(Killed), F.atomic_folder(target) as tmp:
        (tmp / "a").write_text("new")
    monkeypatch.setattr(F.os, "replace", real)
    (tmp_path / ".checkpoint.x1.tmp").mkdir()  # what a real kill leaves: a half-written temporary folder
    assert not target.exists() and F.recover_folder(target)
    assert (target / "a").read_text() == "old" and names(tmp_path) == ["checkpoint"]
    with F.atomic_folder(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new" and names(tmp_path) == ["checkpoint"]


@pytest.fixture
def stopped(tmp_path, data, tokenizer):
    run = tmp_path / "run"
    run_train(tokenizer, data, run, stop_after=2)
    return run


def test_resume_refuses_parts_that_do_not_belong_together(stopped, data, tokenizer, tmp_path):
    folder = stopped / "checkpoint"
    assert state(stopped)["step"] == 2 and set(state(stopped)["files"]) == {A.WEIGHTS, A.CONFIG, L.TRAINER}
    other = tmp_path / "other"
    run_train(tokenizer, data, other, dataclasses.replace(CONFIG, checkpoint_every=1), stop_after=1)
    original = (folder / L.TRAINER).read_bytes()
    (folder / L.TRAINER).write_bytes((other / "checkpoint" / L.TRAINER).read_bytes())  # step-1 optimizer
    with pytest.raises(ValueError, match=rf"checkpoint {folder} is incomplete or altered: trainer.pt"):
        run_train(tokenizer, data, stopped)
    (folder / L.TRAINER).write_bytes(original)
    text = (folder / L.STATE).read_text()
    (folder / L.STATE).write_text(text.replace('"items_seen": 2', '"items_seen": 3'))  # a data position off step
    with pytest.raises(ValueError, match=rf"checkpoint {folder}: its data position \(3 items\) is not step 2 x 1"):
        run_train(tokenizer, data, stopped)
    forged = text.replace('"step": 2', '"step": 1').replace('"items_seen": 2', '"items_seen": 1')
    (folder / L.STATE).write_text(forged)  # a step the files were not made at
    with pytest.raises(ValueError, match=f"checkpoint {folder}: synthesizer.json is for step 2, state.json for step 1"):
        run_train(tokenizer, data, stopped)
    (folder / L.STATE).write_text(text)
    data_copy = tmp_path / "items.jsonl"
    data_copy.write_text(data.read_text())
    (stopped / "config.json").write_text(json.dumps(L._settings(CONFIG, data_copy)))  # same settings, other file
    data_copy.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))  # one item fewer
    with pytest.raises(ValueError, match=rf"checkpoint {folder} belongs to other .*data_sha256, items"):
        run_train(tokenizer, data_copy, stopped)
    (stopped / "config.json").write_text(json.dumps(L._settings(CONFIG, data)))
    run_train(tokenizer, data, stopped)  # put back as it was: it resumes
    assert state(stopped)["step"] == 4


class Exploit:
    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return (exec, (f"open({str(self.mark)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("where", ["trainer.pt", "checkpoint/trainer.pt"])
def test_a_trainer_state_from_someone_elses_run_never_runs_code(stopped, data, tokenizer, tmp_path, where):
    mark = tmp_path / "exploited"
    payload = pickle.dumps({"step": 2, "optimizer": Exploit(mark)}, protocol=2)
    (stopped / where).write_bytes(payload)
    if where.startswith("checkpoint/"):  # a forger updates the manifest too
        manifest = state(stopped)
        manifest["files"][L.TRAINER] = hashlib.sha256(payload).hexdigest()
        (stopped / "checkpoint" / L.STATE).write_text(json.dumps(manifest))
    message = "older parsyn" if where == "trainer.pt" else "holds more than tensors and plain data; refused"
    with pytest.raises(ValueError, match=f"{stopped}.*{message}"):
        run_train(tokenizer, data, stopped)
    assert not mark.exists()


def test_trainer_state_loads_with_weights_only(stopped):
    saved = torch.load(stopped / "checkpoint" / L.TRAINER, weights_only=True)
    assert saved["step"] == 2 and isinstance(saved["torch_rng"], torch.Tensor) and len(saved["python_rng"][1]) == 625


# 4. nothing is written before everything is validated ---------------------------------------------------------------


def test_a_refused_run_leaves_its_folder_free_for_the_corrected_command(tmp_path, data, tokenizer):
    run = tmp_path / "run"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no training items"):
        run_train(tokenizer, empty, run)
    with pytest.raises(ValueError, match="data file not found"):
        run_train(tokenizer, tmp_path / "missing.jsonl", run)
    too_wide = dataclasses.replace(CONFIG, adapter=dataclasses.replace(ADAPTER, rank=65, alpha=130))
    with pytest.raises(ValueError, match=r"AdapterConfig.rank 65 is too large for this model: at most 32"):
        run_train(tokenizer, data, run, too_wide)
    assert not run.exists() or not any(run.iterdir())
    run_train(tokenizer, data, run, dataclasses.replace(CONFIG, steps=1))
    assert state(run)["step"] == 1


# 5. values that cannot work ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig(lr=math.nan), "TrainConfig.lr must be a finite number > 0, got nan"),
    (lambda: TrainConfig(mapper_lr=-1), "TrainConfig.mapper_lr must be a finite number > 0, got -1"),
    (lambda: TrainConfig(seed=2**63), f"TrainConfig.seed must be an integer >= 0 and < {2**63}, got {2**63}"),
    (lambda: TrainConfig(steps=2.5), "TrainConfig.steps must be an integer >= 1, got 2.5"),
    (lambda: TrainConfig(warmup=math.inf), "TrainConfig.warmup must be a finite number >= 0 and < 1, got inf"),
    (lambda: TrainConfig(clip=-1.0), "TrainConfig.clip must be a finite number >= 0, got -1.0"),
    (lambda: TrainConfig(holdout_percent=100), "TrainConfig.holdout_percent must be an integer >= 0 and < 100"),
    (lambda: TrainConfig(layouts=()), "TrainConfig.layouts must be drawn from"),
    (lambda: TrainConfig(adapter=A.AdapterConfig(lora=False)), "TrainConfig.adapter trains nothing"),
    (lambda: TrainConfig.from_dict({"lr": "fast"}), "TrainConfig.lr must be a finite number > 0, got 'fast'"),
    (lambda: TrainConfig.from_dict({"step": 3}), r"TrainConfig has unknown field\(s\) 'step'"),
    (lambda: TrainConfig.from_dict({"loss": {"kl": math.nan}}), "LossConfig.kl must be a finite number >= 0, got nan"),
    (lambda: LossConfig(value_weight=math.inf), "LossConfig.value_weight must be a finite number > 0, got inf"),
    (lambda: A.AdapterConfig(rank=0), "AdapterConfig.rank must be an integer >= 1, got 0"),
    (lambda: A.AdapterConfig(alpha=math.nan), "AdapterConfig.alpha must be a finite number > 0, got nan"),
    (lambda: A.AdapterConfig(lora="yes"), "AdapterConfig.lora must be true or false, got 'yes'"),
    (lambda: A.AdapterConfig(dropout=0.1), r"AdapterConfig.dropout must be 0 \(parsyn's LoRA has no dropout\)"),
    (lambda: A.AdapterConfig(recompute=-1), "AdapterConfig.recompute must be an integer >= 0, got -1"),
    (lambda: A.AdapterConfig.from_dict({"mapper": {"bound": math.nan}}), "MapperConfig.bound must be a finite"),
])
def test_config_values_that_cannot_work_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_rank_beyond_the_layers_is_refused_before_anything_is_allocated(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    with pytest.raises(ValueError, match=r"rank 100000 is too large for this model: at most 32 \(the smallest "
                                         r"targeted layer, model.layers.0.self_attn.k_proj, maps 64 to 32"):
        A.attach(lm, A.AdapterConfig(rank=100000, alpha=1))
    assert A.attach(lm, A.AdapterConfig(rank=32, alpha=64, targets=("k_proj",))).lora is not None


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data, tokenizer,
                                                                                monkeypatch):
    real, calls = L.distill_loss, []

    def diverging(*args):
        loss, parts = real(*args)
        calls.append(1)
        return (loss * math.nan if len(calls) == 3 else loss), parts

    monkeypatch.setattr(L, "distill_loss", diverging)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="the loss at step 3 is not finite"):
        run_train(tokenizer, data, run)
    assert state(run)["step"] == 2 and A.load(tiny_lm("llama", tokenizer), run / "checkpoint").mapper is not None
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# 2. SIGKILL at random moments, then the same command again --------------------------------------------------------

STEPS, EVERY = 8, 2


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "parsyn.cli", *args]


def cli_train(data, run, folder, recipe) -> list[str]:
    return cli("train", str(data), str(run), "--model", str(folder), "--recipe", str(recipe),
               "--steps", str(STEPS), "--checkpoint-every", str(EVERY))


def started(process: subprocess.Popen, run) -> float:
    """Wait until the run folder shows training has begun (its settings are written after validation)."""
    while not (run / "config.json").exists() and process.poll() is None:
        time.sleep(0.02)
    return time.perf_counter()


def weights_written(process: subprocess.Popen, run, count: int) -> None:
    """Wait until `count` distinct weights files have been written anywhere under `run` (temporary
    folders included)."""
    seen: set = set()
    while process.poll() is None and len(seen) < count:
        for path in run.rglob(A.WEIGHTS):
            try:
                stat = path.stat()
                seen.add((stat.st_ino, stat.st_mtime_ns))  # the same file when its folder is renamed
            except FileNotFoundError:  # a temporary folder renamed meanwhile
                pass
        time.sleep(0.001)


def _lines(run) -> list[str]:
    path = run / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def logged(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_the_same_command_ends_bitwise_as_an_uninterrupted_run(tmp_path, data,
                                                                                              tiny_folder):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"train": dataclasses.replace(CONFIG, steps=STEPS, checkpoint_every=EVERY).to_dict()}))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    whole = tmp_path / "whole"
    process = subprocess.Popen(cli_train(data, whole, tiny_folder, recipe), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    begun = started(process, whole)
    assert process.wait(timeout=600) == 0, process.stderr.read()[-2000:]
    window = time.perf_counter() - begun
    expected = load_file(whole / "checkpoint" / A.WEIGHTS)
    assert [step for step, _ in logged(whole)] == list(range(1, STEPS + 1))
    interrupted = []
    for seed in range(3):
        run = tmp_path / f"killed-{seed}"
        process = subprocess.Popen(cli_train(data, run, tiny_folder, recipe), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        started(process, run)
        draw = random.Random(seed)
        if seed == 0:  # anywhere in the run
            time.sleep(draw.uniform(0, window))
        elif seed == 1:  # as soon as the second checkpoint's weights are on disk, before its trainer state
            weights_written(process, run, 2)
        else:  # around the third checkpoint: the line of its step is logged just before it is written
            while process.poll() is None and len(_lines(run)) < 3 * EVERY:
                time.sleep(0.002)
            time.sleep(draw.uniform(0, 0.03))
        process.send_signal(signal.SIGKILL)
        if process.wait(timeout=60) == -signal.SIGKILL:
            interrupted.append(seed)
        again = subprocess.run(cli_train(data, run, tiny_folder, recipe), env=env, capture_output=True, text=True,
                               timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        got = load_file(run / "checkpoint" / A.WEIGHTS)
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got), seed
        assert logged(run) == logged(whole), seed  # every step once, with the very same loss
        assert names(run) == ["checkpoint", "config.json", "metrics.jsonl"]
    assert interrupted, "no kill landed while a run was training"


@pytest.mark.slow
@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "TrainConfig.lr must be a finite number > 0, got nan"),
    ("--seed", str(2**63), f"TrainConfig.seed must be an integer >= 0 and < {2**63}"),
])
def test_the_train_command_refuses_values_that_cannot_work_in_one_line(tmp_path, data, flag, value, message):
    run = tmp_path / "run"
    done = subprocess.run(cli("train", str(data), str(run), flag, value), capture_output=True, text=True, timeout=600)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and message in lines[0], done.stderr
    assert not run.exists()
