"""Hostile and careless input: every case here once failed (a hang, a wrong result, a cryptic message)."""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_lm

from parsyn import model as M
from parsyn.eval.report import write_report
from parsyn.eval.run import EvalConfig, read_predictions, run
from parsyn.files import Records, atomic_folder, read_records
from parsyn.sampling import SamplingParams
from parsyn.workers import fork, from_texts

SMALL = dict(limit=1, workers=2, worker_tokens=4, answer_tokens=4, adapter="none")


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=math.nan), "temperature must be a finite"),
    (dict(temperature=math.inf), "temperature must be a finite"),
    (dict(seed=2**63), r"seed must be in \[0, 2\*\*63\)"),
    (dict(seed=-1), "seed must be in"),
    (dict(stop="###"), "tuple of non-empty strings"),
])
def test_sampling_values_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_evaluation_settings_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="temperature"):
        EvalConfig(tasks=("gsm8k",), temperature=math.nan)
    with pytest.raises(ValueError, match="limit must be at least 1"):
        EvalConfig(tasks=("gsm8k",), limit=0)


def test_a_refused_evaluation_leaves_its_folder_free(tmp_path, tokenizer):
    lm = tiny_lm("llama", tokenizer)
    bad = EvalConfig(tasks=("boolq",), methods=("text", "cache-trained"), **{**SMALL, "adapter": "no/such/ckpt"})
    with pytest.raises(ValueError, match="not a parsyn checkpoint"):
        run(lm, bad, tmp_path)
    assert not (tmp_path / "config.json").exists()
    summary = run(lm, EvalConfig(tasks=("boolq",), methods=("text",), **SMALL), tmp_path)  # the corrected command
    assert summary["rows"][0]["n"] == 1


def test_the_summary_counts_only_this_runs_items_and_names_incomplete_records(tmp_path, tokenizer):
    lm = tiny_lm("llama", tokenizer)
    config = EvalConfig(tasks=("boolq",), methods=("text",), **SMALL)
    run(lm, config, tmp_path)
    path = tmp_path / "predictions.jsonl"
    mine = read_predictions(path)[0]
    stray = {**mine, "id": "boolq-not-in-this-run"}
    path.write_text(path.read_text() + json.dumps(stray) + "\n")
    assert run(lm, config, tmp_path)["rows"][0]["n"] == 1
    text = {k: v for k, v in mine["methods"]["text"].items() if k != "ttft_s"}
    path.write_text(path.read_text() + json.dumps({**mine, "id": "x", "methods": {"text": text}}) + "\n")
    with pytest.raises(ValueError, match=r"malformed line\(s\): 3 \(method 'text' lacks ttft_s"):
        run(lm, config, tmp_path)


def test_a_fifo_in_place_of_a_results_file_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "predictions.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_records(fifo)
    with pytest.raises(ValueError, match="not a regular file"), Records(fifo):
        pass
    os.mkfifo(tmp_path / "summary.json")
    with pytest.raises(ValueError, match="not a regular file"):
        write_report(tmp_path)


def test_skip_skips_a_line_that_is_not_utf8_and_stop_names_it(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "\xff\xfe"}\n{"id": "c"}\n')
    with pytest.raises(ValueError, match=r"2 \(not UTF-8 text\)"):
        read_records(path)
    assert [r["id"] for r in read_records(path, on_error="skip")] == ["a", "c"]


def test_text_that_is_not_utf8_is_refused_by_name(tokenizer):
    lm = tiny_lm("llama", tokenizer)
    undecodable = b"caf\xff".decode("utf-8", errors="surrogateescape")  # what argv holds for such bytes
    with pytest.raises(ValueError, match="the question is not valid UTF-8"):
        fork(lm, undecodable, workers=1)
    with pytest.raises(ValueError, match="branch 2 is not valid UTF-8"):
        from_texts(lm, "Why?", ["fine", undecodable])
    with pytest.raises(ValueError, match="role 1 is not valid UTF-8"):
        fork(lm, "Why?", workers=1, roles=[undecodable])


def test_an_unavailable_device_is_refused_before_loading():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="not available here"):
        M.check_device("cuda")
    with pytest.raises(ValueError, match="not a device"):
        M.check_device("tpu9")


def test_atomic_folders_are_readable_and_clean_up_after_a_killed_writer(tmp_path):
    target = tmp_path / "models" / "m"
    stale = target.with_name(f".{target.name}.left-by-a-kill.tmp")
    stale.mkdir(parents=True)
    with atomic_folder(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").is_file() and not stale.exists()
    assert (target.stat().st_mode & 0o777) == 0o755
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed halfway")
    assert (target / "config.json").is_file() and not list(target.parent.glob(".m.*.tmp"))


@pytest.mark.slow
def test_a_truncated_gguf_is_one_clear_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("PARSYN_CACHE", str(tmp_path / "cache"))
    truncated = tmp_path / "model.gguf"
    truncated.write_bytes(M.registry.gguf("smollm2-135m").read_bytes()[:20_000_000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        M.load(truncated)
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]


def test_concurrent_first_conversions_convert_once_and_all_get_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PARSYN_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(4096))
    calls = []

    def convert(_, out):  # a slow conversion, so that the others arrive while it runs
        calls.append(out)
        time.sleep(0.3)
        (out / "weights.safetensors").write_bytes(b"w")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(M, "_convert", convert)
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: M._converted(gguf), range(4)))
    assert len(calls) == 1 and len(set(folders)) == 1
    assert sorted(p.name for p in folders[0].iterdir()) == ["config.json", "weights.safetensors"]
    assert [p.name for p in folders[0].parent.iterdir() if p.is_dir()] == [folders[0].name]
