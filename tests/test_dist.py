"""Workers on Ray: a real two-node cluster on loopback (a head and a second node, each a `ray start`
process started here, one actor per node), torn down after the module. A Ray fork is compared with a local
fork of the same tokens; actors are killed mid-fork; an evaluation sharded over two nodes is compared item
for item with the one-process run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import torch
from conftest import tiny_lm

from parsyn import model as M
from parsyn.dist import LocalCluster, LocalExecutor, RayExecutor, RayOptions
from parsyn.dist.cluster import check_address
from parsyn.eval.run import EvalConfig, read_predictions
from parsyn.eval.run import run as run_eval
from parsyn.eval.shard import Shards
from parsyn.sampling import SamplingParams
from parsyn.serve.api import create_app
from parsyn.serve.engine import Engine
from parsyn.serve.forks import ForkStore
from parsyn.serve.local import LocalServer
from parsyn.synthesis import prepare, synthesize
from parsyn.workers import Forking, fork, fork_many

pytestmark = pytest.mark.slow

QUESTION = "Name one planet of the solar system."
ROLES = ("Answer in one word.", "Answer with a full sentence.", "Answer and add a fun fact.")
EVAL = EvalConfig(tasks=("gsm8k", "boolq"), methods=("vote", "text", "cache-parallel"), limit=2, workers=2,
                  worker_tokens=8, answer_tokens=8, adapter="none")
TIMINGS = ("ttft_s", "latency_s", "workers_s", "ttft_median_s", "ttft_mean_s", "ttft_p90_s", "latency_median_s")


def leftovers(folder: Path) -> list[int]:
    """Processes whose command line names the cluster's folder (its nodes and their workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(folder).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of two CPUs each: one executor's two actors, and room for a second pair beside them."""
    c = LocalCluster.start(2, cpus=2)
    try:
        yield c
    finally:
        folder = c.folder
        c.close()
        deadline = time.monotonic() + 30
        while leftovers(folder) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not leftovers(folder), "the cluster's processes outlived it"


@pytest.fixture(scope="module")
def executor(cluster, default_lm):
    with RayExecutor(cluster.address, actors=2, timeout_s=120) as ex:
        yield ex.ready(default_lm)


def assert_same_fork(local, remote, atol=1e-4):
    assert [b.token_ids for b in remote.branches] == [b.token_ids for b in local.branches]
    assert [(b.text, b.role, b.generated) for b in remote.branches] == [(b.text, b.role, b.generated)
                                                                         for b in local.branches]
    assert remote.prefix_ids == local.prefix_ids
    for a, b in zip(local.branches, remote.branches):
        assert torch.equal(a.kv.positions, b.kv.positions)
        for x, y in zip(a.kv.keys + a.kv.values, b.kv.keys + b.kv.values):
            torch.testing.assert_close(y, x, atol=atol, rtol=0)


def test_import_parsyn_never_imports_ray_and_a_missing_ray_says_how_to_install_it():
    program = ("import sys, parsyn, parsyn.dist, parsyn.eval.shard; assert 'ray' not in sys.modules, 'ray imported'; "
               "sys.modules['ray'] = None; from parsyn.dist.cluster import require\n"
               "try: require()\nexcept ValueError as e: print(e)")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install 'parsyn[dist]'" in done.stdout


def test_the_local_executor_is_the_plain_fork(tokenizer):
    lm = tiny_lm("qwen3", tokenizer)
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, seed=4)
    plain, local = (fork(lm, QUESTION, workers=2, roles=ROLES[:2], sampling=sampling, executor=e)
                    for e in (None, LocalExecutor()))
    assert_same_fork(plain, local, atol=0)


@pytest.mark.parametrize("options, message", [(dict(actors=0), "actors must be"), (dict(prefix="send"), "prefix"),
                                              (dict(returns="text"), "returns"), (dict(timeout_s=0), "positive"),
                                              (dict(device="tpu"), "device")])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        RayOptions(**options)
    for bad in ("", "nohost", "host:port", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            check_address(bad)


def test_a_ray_fork_is_the_local_fork(executor, default_lm):
    sampling = SamplingParams(max_new_tokens=16, temperature=0.8, seed=1)
    local = fork(default_lm, QUESTION, workers=3, roles=ROLES, sampling=sampling)
    remote = fork(default_lm, QUESTION, workers=3, roles=ROLES, sampling=sampling, executor=executor)
    assert_same_fork(local, remote)
    shipped = executor.last
    assert (shipped.actors, shipped.rows, shipped.prefix, shipped.retried) == (2, 3, "ship", ())
    assert shipped.branch_tokens == sum(len(b.token_ids) for b in remote.branches)
    assert shipped.branch_bytes == sum(len(b.kv.to_bytes(default_lm.fingerprint)) for b in remote.branches)
    # the synthesizer reads the shipped caches as it reads local ones: first-token logits, greedy answer
    for layout in ("parallel", "sequential"):
        first = [prepare(default_lm, f, route="cache", layout=layout, max_new_tokens=12).logits
                 for f in (local, remote)]
        torch.testing.assert_close(first[1], first[0], atol=1e-4, rtol=0)
    answers = [synthesize(default_lm, f, route="cache", sampling=SamplingParams(8)).token_ids for f in (local, remote)]
    assert answers[0] == answers[1]


def test_recomputed_prefixes_ids_only_and_one_worker_per_share_give_the_same_forks(executor, default_lm):
    questions = ["Name one planet.", "Which is the largest planet of the solar system, and why?"]
    roles = [["Answer in one word.", "Answer with a sentence."], ["Be brief.", "Add a fact.", "Explain."]]
    sampling = [SamplingParams(max_new_tokens=6, temperature=0.9, seed=3), SamplingParams(max_new_tokens=6)]
    local = fork_many(default_lm, questions, roles=roles, sampling=sampling)
    kept = executor.options
    try:
        executor.options = dataclasses.replace(kept, prefix="recompute", returns="ids")
        remote = fork_many(default_lm, questions, roles=roles, sampling=sampling, batched=False, executor=executor)
        assert (executor.last.prefix, executor.last.prefix_bytes, executor.last.branch_bytes) == ("recompute", 0, 0)
        executor.options = dataclasses.replace(kept, prefix="auto")
        fork(default_lm, questions[0], workers=2, sampling=SamplingParams(4), executor=executor)
        assert executor.rate_Bps > 0 and executor.last.prefix in ("ship", "recompute")
    finally:
        executor.options = kept
    for a, b in zip(local, remote):
        assert_same_fork(a, b)


def test_another_model_a_join_and_a_cluster_without_room_are_refused(cluster, executor, default_lm, tokenizer,
                                                                      tiny_folder):
    with pytest.raises(ValueError, match="hold another model"):
        fork(tiny_lm("llama", tokenizer), QUESTION, workers=2, sampling=SamplingParams(4), executor=executor)
    with RayExecutor(cluster.address, actors=1, model=str(tiny_folder), timeout_s=120) as other:
        with pytest.raises(ValueError, match="same weights in the same dtype"):
            fork(default_lm, QUESTION, workers=2, sampling=SamplingParams(4), executor=other)
    with pytest.raises(ValueError, match="need local workers"):
        fork(default_lm, QUESTION, workers=2, quorum=1, executor=executor)
    t0 = time.monotonic()
    with RayExecutor(cluster.address, actors=1, cpus=16, timeout_s=3) as huge:
        with pytest.raises(ValueError, match="did not start within 3 s"):
            fork(default_lm, QUESTION, workers=2, sampling=SamplingParams(4), executor=huge)
    assert time.monotonic() - t0 < 30  # a timeout, never a hang


def test_the_server_dispatches_worker_rows_to_the_actors(executor, default_lm):
    engine = Engine(default_lm, executor=executor).start()
    app = create_app(default_lm, model_name="smollm2", engine=engine, store=ForkStore(64 << 20, ttl_s=600))
    body = {"question": QUESTION, "workers": 2, "roles": list(ROLES[:2]), "max_tokens": 8, "temperature": 0}
    chat = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, "temperature": 0}
    try:
        with LocalServer(app) as url:
            answered = {}
            worker = threading.Thread(target=lambda: answered.update(chat=httpx.post(
                url + "/v1/chat/completions", json=chat, timeout=120).json()))
            worker.start()  # a plain chat decodes in the engine's batch while the workers run on the actors
            got = httpx.post(url + "/v1/forks", json=body, timeout=120).json()
            worker.join(120)
    finally:
        engine.stop()
    local = fork(default_lm, QUESTION, workers=2, roles=ROLES[:2], sampling=SamplingParams(8))
    assert [b["text"] for b in got["branches"]] == [b.text for b in local.branches]
    assert executor.last.rows == 2 and answered["chat"]["choices"][0]["message"]["content"]


def parsyn(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of the command line's entry point, run in this process (a new process
    would spend ~9 s starting; this one is already connected to the cluster, as `--ray ADDRESS` connects)."""
    from parsyn.cli import main

    monkeypatch.setattr(sys, "argv", ["parsyn", *args])
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_run_command_forks_on_ray(cluster, default_lm, capsys, monkeypatch):
    args = ["run", QUESTION, "--workers", "2", "--max-new-tokens", "8", "--route", "cache", "--adapter", "none",
            "--model", "smollm2-135m", "--json", "--ray", cluster.address, "--ray-actors", "1"]
    code, out, err = parsyn(args, capsys, monkeypatch)
    assert code == 0, err[-2000:]
    local = fork(default_lm, QUESTION, workers=2, sampling=SamplingParams(8, 0.7, 0.95, 0))
    assert [b["text"] for b in json.loads(out)["branches"]] == [b.text for b in local.branches]
    for extra, says in [(["--ray", "nowhere"], "a Ray address is"), (["--ray", "local", "--quorum", "1"], "--quorum"),
                        (["--ray", "local", "--branch", "Mars."], "does not apply to --branch")]:
        code, _, err = parsyn(["run", QUESTION, *extra], capsys, monkeypatch)
        assert code == 2 and says in err


def without_timings(record):
    """A record without its timings, its first-token candidates without their log-probabilities (compared
    apart, within 1e-4: an actor's one torch thread sums in another order than the driver's two)."""
    if isinstance(record, dict):
        return {k: [i for i, _ in v] if k == "first_top" else without_timings(v)
                for k, v in record.items() if k not in TIMINGS}
    return [without_timings(v) for v in record] if isinstance(record, list) else record


def logprobs(path: Path) -> dict:
    return {(r["id"], m): [p for _, p in got["first_top"]] for r in read_predictions(path)
            for m, got in r["methods"].items() if "first_top" in got}


def assert_same_records(path: Path, one: Path) -> None:
    assert {r["id"]: without_timings(r) for r in read_predictions(path)} == {
        r["id"]: without_timings(r) for r in read_predictions(one)}
    mine, theirs = logprobs(path), logprobs(one)
    assert mine.keys() == theirs.keys() and all(v == pytest.approx(theirs[k], abs=1e-4) for k, v in mine.items())


def test_an_evaluation_sharded_over_two_nodes_equals_the_one_process_run(cluster, tiny_folder, tmp_path):
    lm = M.load(tiny_folder)
    whole = run_eval(lm, EVAL, tmp_path / "one")
    one, path = tmp_path / "one" / "predictions.jsonl", tmp_path / "ray" / "predictions.jsonl"
    with Shards(cluster.address, model=str(tiny_folder), actors=2, timeout_s=120) as shards:
        sharded = run_eval(lm, EVAL, tmp_path / "ray", shards=shards)
        assert_same_records(path, one)
        assert without_timings(sharded["rows"]) == without_timings(whole["rows"])
        # a run stopped after one group, mid-line: the rerun loses nothing and counts nothing twice
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(lines[0] + lines[1][:40])
        again = run_eval(lm, EVAL, tmp_path / "ray", shards=shards)
    ids = [json.loads(line)["id"] for line in path.read_bytes().splitlines()]
    assert sorted(ids) == sorted(r["id"] for r in read_predictions(one))
    assert_same_records(path, one)
    assert without_timings(again["rows"]) == without_timings(whole["rows"])


def test_a_killed_actor_mid_fork_is_retried_on_the_other(executor, default_lm):
    question, roles = "Tell a long story about a dragon and a knight.", ROLES[1:]
    sampling = SamplingParams(max_new_tokens=48)
    local = fork(default_lm, question, workers=2, roles=roles, sampling=sampling)
    executor.ready(default_lm)
    victim = executor.pids[0]
    plan = Forking.plan(default_lm, [question], workers=2, roles=roles, sampling=sampling, rows_at_once=1)
    remote = executor.start(plan)
    time.sleep(0.4)  # the actor is decoding its worker (48 steps take most of a second on one thread)
    os.kill(victim, signal.SIGKILL)
    remote_fork = plan.forks(remote.wait())[0]
    assert_same_fork(local, remote_fork)
    assert len(executor.last.retried) == 1 and f"pid {victim}" in executor.last.retried[0]
    assert "died" in executor.last.retried[0] and victim not in executor.pids


def test_every_actor_lost_mid_fork_is_a_clear_error_not_a_hang(executor, default_lm):
    executor.ready(default_lm)  # the actor killed above is replaced
    victims = executor.pids
    plan = Forking.plan(default_lm, [QUESTION], workers=2, sampling=SamplingParams(max_new_tokens=48), rows_at_once=1)
    remote = executor.start(plan)
    time.sleep(0.4)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="died: .*(no other actor is left|failed twice)"):
        remote.wait()
    assert time.monotonic() - t0 < 60
