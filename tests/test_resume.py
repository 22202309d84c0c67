"""Long jobs stopped from outside: Ctrl-C and SIGTERM exit non-zero saying what was kept, and a job killed
at a random moment resumes to exactly what an uninterrupted run gives. Real subprocesses, real signals."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parsyn import model as M
from parsyn.eval.run import EvalConfig, read_predictions
from parsyn.eval.run import run as run_eval
from parsyn.files import read_records
from parsyn.train.data import DataConfig, generate

pytestmark = pytest.mark.slow

DATA = DataConfig(items=16, batch=4)  # what the command line below asks for
EVAL = EvalConfig(tasks=("gsm8k", "boolq"), methods=("text", "cache-parallel"), limit=2, workers=2, worker_tokens=8,
                  answer_tokens=8, adapter="none")  # what the command line below asks for
TIMINGS = ("ttft_s", "latency_s", "workers_s")


def start(*args: str) -> subprocess.Popen:
    # restore Ctrl-C's default: a test runner may have started us with SIGINT ignored
    return subprocess.Popen([sys.executable, "-m", "parsyn.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def stop_when(proc: subprocess.Popen, path: Path, count: int, sig: int, extra_s: float = 0.0) -> tuple[int, str]:
    """Send `sig` once `path` holds `count` lines (and `extra_s` more seconds passed); rc and stderr."""
    deadline = time.time() + 300
    while lines(path) < count and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(extra_s)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def without_timings(record):
    if isinstance(record, dict):
        return {k: without_timings(v) for k, v in record.items() if k not in TIMINGS}
    return [without_timings(v) for v in record] if isinstance(record, list) else record


@pytest.fixture(scope="module")
def data_baseline(tmp_path_factory, tiny_folder):
    path = generate(M.load(tiny_folder), tmp_path_factory.mktemp("whole"), DATA)  # as the command line loads it
    return sorted(read_records(path), key=lambda r: r["id"])


def data_args(folder: Path, tiny_folder) -> list[str]:
    return ["data", str(folder), "--items", str(DATA.items), "--batch", str(DATA.batch), "--model", str(tiny_folder)]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_command_exits_non_zero_and_says_what_it_kept(tmp_path, tiny_folder, sig, code):
    args = data_args(tmp_path, tiny_folder)
    args[args.index("--items") + 1] = "400"  # long enough to be stopped halfway
    rc, err = stop_when(start(*args), tmp_path / "items.jsonl", 4, sig)
    kept = lines(tmp_path / "items.jsonl")
    last = err.strip().splitlines()[-1]
    assert rc == code and 4 <= kept < 400 and "Traceback" not in err
    assert last == (f"parsyn: interrupted: {kept} of 400 items are in {tmp_path / 'items.jsonl'}; "
                    "run the same command to resume"), last


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_data_killed_at_a_random_moment_resumes_exactly(tmp_path, tiny_folder, data_baseline, seed):
    rng = random.Random(seed)
    args = data_args(tmp_path, tiny_folder)
    rc, _ = stop_when(start(*args), tmp_path / "items.jsonl", rng.randrange(DATA.items), signal.SIGKILL,
                      rng.random() * 0.5)
    assert rc == -signal.SIGKILL
    done = start(*args)
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-2000:]
    assert sorted(read_records(tmp_path / "items.jsonl"), key=lambda r: r["id"]) == data_baseline


@pytest.fixture(scope="module")
def eval_baseline(tmp_path_factory, tiny_folder):
    folder = tmp_path_factory.mktemp("eval-whole")
    run_eval(M.load(tiny_folder), EVAL, folder)
    return [without_timings(r) for r in read_predictions(folder / "predictions.jsonl")]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_evaluation_killed_at_a_random_moment_resumes_exactly(tmp_path, tiny_folder, eval_baseline, seed):
    rng = random.Random(seed)
    args = ["eval", "--tasks", ",".join(EVAL.tasks), "--methods", ",".join(EVAL.methods), "--limit", str(EVAL.limit),
            "--workers", str(EVAL.workers), "--max-new-tokens", "8", "--adapter", "none", "--model", str(tiny_folder),
            "--out", str(tmp_path)]
    rc, _ = stop_when(start(*args), tmp_path / "predictions.jsonl", rng.randrange(len(eval_baseline)),
                      signal.SIGKILL, rng.random() * 0.5)
    assert rc == -signal.SIGKILL
    done = start(*args)
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-2000:]
    assert [without_timings(r) for r in read_predictions(tmp_path / "predictions.jsonl")] == eval_baseline
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["n"] for r in summary["rows"] if r["task"] == "all"} == {len(eval_baseline)}
