"""The command line, run as a user runs it: a real subprocess on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

pytestmark = pytest.mark.slow


def parsyn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parsyn.cli", *args], capture_output=True, text=True, timeout=600)


def refused(args, in_process: bool, capsys, monkeypatch) -> tuple[int, str]:
    """Exit status and stderr of a command that must fail: in a real subprocess, or (the ~9 s start-up of a
    new process saved) through the same entry point in this process."""
    if not in_process:
        done = parsyn(*args)
        return done.returncode, done.stderr
    from parsyn.cli import main

    monkeypatch.setattr(sys, "argv", ["parsyn", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    return stop.value.code, capsys.readouterr().err


def test_run_both_routes_as_json():
    done = parsyn("run", "What is the capital of France?", "--workers", "2", "--max-new-tokens", "16",
                  "--role", "Answer briefly.", "--role", "Answer with one fact.", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [b["role"] for b in report["branches"]] == ["Answer briefly.", "Answer with one fact."]
    assert all(b["text"] and b["tokens"] > b["generated"] > 0 for b in report["branches"])
    text, cache = report["routes"]["text"], report["routes"]["cache"]
    assert cache["layout"] == "parallel" and text["layout"] is None
    assert text["prefill_tokens"] > cache["prefill_tokens"] > 0
    # the packaged synthesizer is on by default: its mapper calibrates every branch span
    assert report["adapter"] == "auto (packaged)"
    assert [p["how"] for p in cache["provenance"]] == ["reused", "mapped", "mapped", "recomputed"]
    # the spans account for every token: branches as long as reported, the prompt is what the cache route prefilled
    tokens = [b["tokens"] for b in report["branches"]]
    assert [p["length"] for p in cache["provenance"][1:3]] == tokens
    assert cache["provenance"][-1]["length"] == cache["prefill_tokens"]
    assert text["prefill_tokens"] == cache["provenance"][0]["length"] + sum(tokens) + cache["prefill_tokens"]
    assert [p["start"] for p in cache["provenance"][1:3]] == [cache["provenance"][0]["length"]] * 2  # parallel
    raw = json.loads(parsyn("run", "What is the capital of France?", "--workers", "2", "--max-new-tokens", "4",
                            "--adapter", "none", "--json").stdout)
    assert raw["adapter"] is None
    assert [p["how"] for p in raw["routes"]["cache"]["provenance"]] == ["reused", "reused", "reused", "recomputed"]


def test_run_with_a_quorum_synthesizes_the_first_finished_workers():
    done = parsyn("run", "Which planet is largest?", "--model", "smollm2-135m", "--workers", "3", "--quorum", "1",
                  "--role", "Answer with one word.", "--role", "Explain in detail, with history.",
                  "--role", "Describe every planet in turn.", "--max-new-tokens", "40", "--route", "cache", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [b["role"] for b in report["branches"]] == ["Answer with one word."] and report["cut"] == [1, 2]
    assert [p["how"] for p in report["routes"]["cache"]["provenance"]] == ["reused", "mapped", "recomputed"]
    done = parsyn("run", "Which planet is largest?", "--model", "smollm2-135m", "--workers", "3", "--quorum", "1",
                  "--role", "Answer with one word.", "--role", "Explain in detail, with history.",
                  "--role", "Describe every planet in turn.", "--max-new-tokens", "40", "--route", "cache", "--json",
                  "--fold")
    assert done.returncode == 0, done.stderr
    folded = json.loads(done.stdout)
    assert folded["branches"] == report["branches"] and folded["cut"] == [1, 2]  # the early answer, as above
    assert len(folded["folded"]["branches"]) == 3 and folded["folded"]["cut"] == []  # then every worker's
    assert folded["folded"]["branches"][0] == report["branches"][0] and folded["folded"]["routes"]["cache"]["answer"]


def test_run_given_branches_with_display():
    done = parsyn("run", "Which planet is largest?", "--branch", "Jupiter.",
                  "--branch", "Jupiter is the largest planet.",
                  "--route", "cache", "--layout", "sequential", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    assert "worker 2" in done.stdout and "cache (sequential," in done.stdout and "trained)" in done.stdout
    assert "Jupiter is the largest" in done.stdout
    done = parsyn("run", "Which planet is largest?", "--branch", "Jupiter, the fifth planet, is the largest. " * 4,
                  "--branch", "Saturn is smaller than Jupiter. " * 4, "--route", "cache", "--keep", "0.5",
                  "--kv-bits", "8", "--max-new-tokens", "8", "--json")
    assert done.returncode == 0, done.stderr
    assert "compressed" in {p["how"] for p in json.loads(done.stdout)["routes"]["cache"]["provenance"]}


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "  "], "the question is empty"),
        (["run", "Why?", "--workers", "0"], "need at least one worker"),
        (["run", "Why?", "--model", "no/such/model"], "model not found"),
        (["run", "Why?", "--model", "tests"], "no config.json"),
        (["run", "Why?", "--model", "GPT2"], "no rotary position embeddings"),
        (["run", "Why?", "--branch", "many words " * 6000], "positions"),
        (["run", "Why?", "--workers", "3", "--role", "a", "--role", "b"], "2 roles for 3 workers"),
        (["run", "Why?", "--max-new-tokens", "0"], "max_new_tokens"),
        (["run", "Why?", "--temperature", "nan"], "temperature must be a finite number"),
        (["run", "Why?", "--seed", str(2**63)], "seed must be in [0, 2**63)"),
        (["run", "Why?", "--adapter", "no/such/checkpoint"], "not a parsyn checkpoint"),
        (["run", "Why?", "--workers", "2", "--quorum", "3"], "a quorum of 3 needs at least 3 workers"),
        (["run", "Why?", "--deadline", "0"], "deadline must be a positive"),
        (["run", "Why?", "--branch", "Yes.", "--quorum", "1"], "do not apply to --branch"),
        (["run", "Why?", "--fold"], "give one of them"),
        (["run", "Why?", "--keep", "0"], "keep must be a fraction"),
        (["run", "Why?", "--kv-bits", "4"], "bits must be 8"),
        (["run", "Why?", "--keep", "0.5", "--route", "text"], "compress the cache route"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(args, message, gpt2_folder, capsys, monkeypatch):
    args = [str(gpt2_folder) if a == "GPT2" else a for a in args]
    code, stderr = refused(args, args != ["run", "  "], capsys, monkeypatch)
    lines = stderr.strip().splitlines()
    assert code != 0 and len(lines) == 1 and message in lines[0] and "Traceback" not in stderr, stderr


def test_unknown_option_values_are_usage_errors():
    done = parsyn("run", "Why?", "--route", "telepathy")
    assert done.returncode == 2 and "telepathy" in done.stderr and "Traceback" not in done.stderr


def test_bench_eval_and_report_commands(tmp_path, tiny_folder):
    done = parsyn("bench", "--random-shape", "tiny-qwen3", "--branches", "1,2", "--lengths", "32", "--repeats", "1",
                  "--json", "--out", str(tmp_path / "bench.json"))
    assert done.returncode == 0, done.stderr
    cells = json.loads(done.stdout)
    assert [(c["branches"], c["length"]) for c in cells] == [(1, 32), (2, 32)]
    assert set(cells[0]) >= {"text_ttft_s", "cache_ttft_s", "floor_s", "speedup", "overhead"}
    fit = json.loads((tmp_path / "bench.json").read_text())["slopes"]  # two cells of 32 and 64 tokens: a line
    assert fit["cells"] == 2 and set(fit) >= {"text", "cache", "floor", "text_over_cache"}
    done = parsyn("eval", "--tasks", "gsm8k,boolq", "--methods", "text,cache-parallel,ape", "--limit", "1",
                  "--workers", "2", "--max-new-tokens", "4", "--model", str(tiny_folder),
                  "--out", str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {r["method"] for r in summary["rows"]} == {"text", "cache-parallel", "ape"} and "gsm8k" in done.stdout
    done = parsyn("report", str(tmp_path / "eval"), "--bench", str(tmp_path / "bench.json"))
    assert done.returncode == 0, done.stderr
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "speed-up" in html.lower() and html.count("data:image/png;base64") == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--tasks", "gsm9k", "--out", "x"], "unknown task"),
        (["eval", "--tasks", "gsm8k", "--methods", "magic", "--out", "x"], "unknown method"),
        (["bench", "--branches", "two"], "comma-separated integers"),
        (["bench", "--random-shape", "tiny-qwen3", "--tokenizer", "no/such/folder"], "no tokenizer_config.json"),
        (["bench", "--random-shape", "qwen9"], "unknown shape"),
        (["report", "no/such/folder"], "summary.json"),
        (["train", "no/such.jsonl", "run"], "data file not found"),
        (["train", "no/such.jsonl", "run", "--recipe", "nosuch"], "unknown recipe"),
        (["fidelity", "auto", "--data", "x.jsonl", "--probe", "-5"], "--probe must be >= 0"),
        (["bench", "--device", "tpu9"], "not a device"),
        (["bench", "--graphs"], "needs --device cuda"),
        (["calibrate", "x", "--max-regress", "1.5"], "must be a fraction in [0, 1]"),
        (["calibrate", "no/such/folder"], "no finished evaluation items"),
        (["run", "Why?", "--route", "auto"], "--route auto needs --gate FILE"),
        (["run", "Why?", "--gate", "g.json"], "--gate applies to --route auto only"),
        (["serve", "--gate", "no/such/gate.json"], "gate file not found"),
        (["derive", "ckpt", "ckpt"], "another folder than its source"),
        (["derive", "no/such/ckpt", "out", "--model", "smollm2-135m"], "not a parsyn checkpoint"),
        (["agent", "Why?", "--synth-tool-turns", "-1"], "tool turns >= 0"),
    ],
)
def test_program_commands_refuse_bad_input_in_one_line(args, message, capsys, monkeypatch):
    code, stderr = refused(args, args[0] != "train", capsys, monkeypatch)
    lines = stderr.strip().splitlines()
    assert code != 0 and len(lines) == 1 and message in lines[0] and "Traceback" not in stderr, stderr


def test_calibrate_then_run_the_gate(tmp_path, tiny_folder, capsys, monkeypatch):
    done = parsyn("eval", "--tasks", "boolq,facts", "--methods", "text,cache-parallel,cache-sequential,cache-recompute",
                  "--limit", "4", "--workers", "2", "--max-new-tokens", "3", "--adapter", "none", "--model",
                  str(tiny_folder), "--out", str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    done = parsyn("calibrate", str(tmp_path / "eval"), "--max-regress", "0")
    assert done.returncode == 0, done.stderr
    gate = json.loads((tmp_path / "eval" / "gate.json").read_text())
    assert gate["format"] == "parsyn-gate" and gate["max_regress"] == 0 and gate["calibration"]["regression_rate"] == 0
    assert gate["layout"] == "parallel"  # the guarded cache-parallel's: what `run --route auto` then runs
    assert (tmp_path / "eval" / "tradeoff.png").is_file() and "auto ≤2%" in done.stdout
    assert "random halves" in done.stderr and "bound on new items" in done.stderr
    blend = ["calibrate", str(tmp_path / "eval"), "--method", "cache-recompute"]
    code, stderr = refused(blend, True, capsys, monkeypatch)
    assert code == 2 and "a gate guards one of cache-parallel" in stderr  # a method it cannot run
    done = parsyn("run", "Who lives in Oslo?", "--branch", "Vera lives in Oslo.", "--branch", "Ann lives in Lima.",
                  "--route", "auto", "--gate", str(tmp_path / "eval" / "gate.json"), "--adapter", "none",
                  "--max-new-tokens", "4", "--model", str(tiny_folder), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["auto"]["choice"] in ("cache", "recompute", "text") and "auto" in report["routes"]
