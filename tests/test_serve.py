"""The server: a real uvicorn on loopback, the official openai client, real HTTP (httpx), a tiny random
model; answers are checked against the in-process routes on the same branches."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest
from conftest import tiny_lm
from openai import OpenAI
from page_screenshot import chromium, run_page  # benchmarks/: the page driven the same way there

from parsyn.chat import ChatFormat
from parsyn.decode import Row, decode
from parsyn.forward import prefill_rows
from parsyn.sampling import SamplingParams
from parsyn.serve.api import Limits, create_app
from parsyn.serve.engine import Engine
from parsyn.serve.forks import ForkStore
from parsyn.serve.local import LocalServer, free_port
from parsyn.synthesis import synthesize
from parsyn.workers import answer_text, fork, from_texts

QUESTION = "Which city hosts the meeting?"
BRANCHES = ["The meeting is in Paris.", "It starts at ten.", "Bring a laptop."]


class Served(LocalServer):
    def __init__(self, app):
        super().__init__(app)
        self.start()

    def close(self):
        self.stop()


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_lm("llama", tokenizer)


@pytest.fixture(scope="module")
def served(lm):
    engine = Engine(lm, max_queue=8).start()
    store = ForkStore(4 << 20, ttl_s=600)
    app = create_app(lm, model_name="tiny", engine=engine, store=store, limits=Limits(max_body_bytes=64_000))
    s = Served(app)
    s.engine, s.store = engine, store
    yield s
    s.close()
    engine.stop()


@pytest.fixture(scope="module")
def client(served):
    return OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def events(response) -> list:
    """The data of each server-sent event, [DONE] last."""
    out = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    return [json.loads(d) if d != "[DONE]" else d for d in out]


def test_openai_client_chat_completions_plain_and_streamed(served, client, lm):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, n=2)
    state, logits = prefill_rows(lm, [ChatFormat(lm.tokenizer).chat_ids(messages)])
    alone = answer_text(lm, decode(lm, state, logits, [Row(0, SamplingParams(6))])[0])  # the library's own turn
    assert [c.message.content for c in r.choices] == [alone, alone] and r.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == alone and chunks[-1].usage.completion_tokens == 6
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason == "length"
    sampled = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=1.0,
                                              seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible


def test_workers_and_synthesis_in_one_completion_match_the_library(served, client, lm):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0,
        extra_body={"parsyn": {"workers": 2, "roles": ["Be brief.", "Be precise."], "route": "both",
                               "worker_max_tokens": 6, "worker_temperature": 0}})
    p = r.parsyn
    assert set(p["answers"]) == {"cache", "text"} and len(p["fork"]["branches"]) == 2
    f = fork(lm, QUESTION, workers=2, roles=["Be brief.", "Be precise."], sampling=SamplingParams(6))
    assert [b["text"] for b in p["fork"]["branches"]] == [b.text for b in f.branches]
    for route in ("cache", "text"):
        assert p["answers"][route]["answer"] == synthesize(lm, f, route=route, sampling=SamplingParams(8)).answer
    assert r.choices[0].message.content == p["answers"]["cache"]["answer"]
    context = p["fork"]["prefix_tokens"] + sum(b["tokens"] for b in p["fork"]["branches"])
    assert r.usage.prompt_tokens_details.cached_tokens == context == p["answers"]["cache"]["cached_tokens"]
    assert p["answers"]["cache"]["prefill_tokens"] < p["answers"]["text"]["prefill_tokens"]


def test_concurrent_requests_batch_together_and_each_gets_its_own_answer(served, lm):
    questions = [f"{QUESTION} Case {i}." for i in range(6)]
    expected = {q: synthesize(lm, from_texts(lm, q, BRANCHES), route="cache", sampling=SamplingParams(8)).answer
                for q in questions}
    before = served.engine.steps

    def one(q):
        fid = httpx.post(served.url + "/v1/forks", json={"question": q, "branches": BRANCHES}).json()["id"]
        body = httpx.post(f"{served.url}/v1/forks/{fid}/synthesize", json={"max_tokens": 8}, timeout=60).json()
        return q, body["answers"]["cache"]["answer"]

    with ThreadPoolExecutor(6) as pool:
        got = dict(pool.map(one, questions))
    assert got == expected
    assert served.engine.steps - before < 6 * 8  # rows of different requests shared steps


def test_fork_handles_synthesize_again_grow_and_go(served, lm):
    url = served.url + "/v1/forks"
    f = httpx.post(url, json={"question": QUESTION, "branches": BRANCHES[:2]}).json()
    assert [b["text"] for b in f["branches"]] == BRANCHES[:2] and f["bytes"] > 0
    first = [httpx.post(f"{url}/{f['id']}/synthesize", json={"max_tokens": 6}).json() for _ in range(2)]
    assert first[0]["answers"]["cache"]["answer"] == first[1]["answers"]["cache"]["answer"]  # never mutated
    grown = httpx.post(f"{url}/{f['id']}/branches", json={"text": BRANCHES[2]}).json()
    assert len(grown["branches"]) == 3 and httpx.get(f"{url}/{f['id']}").json()["branches"] == grown["branches"]
    again = httpx.post(f"{url}/{f['id']}/synthesize", json={"max_tokens": 6, "route": "text"}).json()
    library = synthesize(lm, from_texts(lm, QUESTION, BRANCHES), route="text", sampling=SamplingParams(6))
    assert again["answers"]["text"]["answer"] == library.answer
    streamed = events(httpx.post(f"{url}/{f['id']}/synthesize", json={"max_tokens": 6, "stream": True}))
    assert streamed[-1] == "[DONE]" and streamed[-2]["object"] == "fork.synthesis"
    assert "".join(e["delta"] for e in streamed[:-2]).strip() == streamed[-2]["answers"]["cache"]["answer"]
    assert httpx.delete(f"{url}/{f['id']}").json()["deleted"]
    gone = httpx.post(f"{url}/{f['id']}/synthesize", json={})
    assert gone.status_code == 404 and "was deleted" in gone.json()["error"]["message"]
    workers = events(httpx.post(url, json={"question": QUESTION, "workers": 2, "max_tokens": 5, "stream": True}))
    assert workers[-2]["object"] == "fork" and {e["branch"] for e in workers[:-2]} <= {0, 1}


def test_forks_are_evicted_least_recently_used_within_the_byte_budget(served):
    url = served.url + "/v1/forks"
    branches = [b + " More detail." * 30 for b in BRANCHES]  # about 160 KiB of K/V a fork
    ids = [httpx.post(url, json={"question": f"{QUESTION} {i}", "branches": branches}).json()["id"]
           for i in range(40)]
    assert served.store.bytes <= served.store.budget and served.store.evictions > 0
    gone = httpx.get(f"{url}/{ids[0]}")
    assert gone.status_code == 404 and "evicted" in gone.json()["error"]["message"]
    assert httpx.get(f"{url}/{ids[-1]}").status_code == 200
    assert httpx.get(f"{url}/fork-unknown").json()["error"]["message"] == "no fork 'fork-unknown'"


@pytest.mark.parametrize("body, status, says", [
    (b'{"messages": [', 400, "malformed JSON"),
    ({"messages": [{"role": "user", "content": "x"}], "bogus": 1}, 400, "bogus: unknown field"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 99}, 400, "n:"),
    ({"messages": [{"role": "user", "content": "x"}], "parsyn": {"workers": 50}}, 400, "workers:"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100_000}, 400, "positions"),
    ({"messages": [{"role": "user", "content": "x" * 70_000}]}, 413, "over 64000 bytes"),
    ({"messages": [{"role": "assistant", "content": "x"}], "parsyn": {}}, 400, "one user message"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "not served here"),
])
def test_bad_requests_get_their_status_and_the_server_keeps_serving(served, client, body, status, says):
    raw = isinstance(body, bytes)
    kw = {"content": body, "headers": {"content-type": "application/json"}} if raw else {"json": body}
    r = httpx.post(served.url + "/v1/chat/completions", **kw)
    assert r.status_code == status and says in r.json()["error"]["message"], r.text
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_a_client_gone_mid_stream_leaves_the_batch(served):
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body) as r:
        for _ in zip(range(3), r.iter_lines()):
            pass
    deadline = time.time() + 20
    while (served.engine.rows or served.engine.active) and time.time() < deadline:
        time.sleep(0.05)
    assert served.engine.rows == 0 and not served.engine.active
    body = {**body, "max_tokens": 2, "stream": False, "temperature": 0}
    good = httpx.post(served.url + "/v1/chat/completions", json=body)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def test_a_full_queue_answers_429_with_retry_after(lm):
    engine = Engine(lm, max_queue=1, max_rows=1).start()
    s = Served(create_app(lm, model_name="tiny", engine=engine))
    try:
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 300}
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120),
                                  range(4)))
        refused = [r for r in codes if r.status_code == 429]
        assert refused and all(r.headers["retry-after"] == "1" for r in refused)
        assert all(r.status_code in (200, 429) for r in codes) and any(r.status_code == 200 for r in codes)
    finally:
        s.close()
        engine.stop()


def test_an_api_key_guards_every_endpoint_but_healthz(lm, served):
    s = Served(create_app(lm, model_name="tiny", engine=served.engine, api_key="sesame"))
    try:
        assert httpx.get(s.url + "/healthz").status_code == 200
        denied = httpx.get(s.url + "/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert httpx.get(s.url + "/metrics", headers={"authorization": "Bearer wrong"}).status_code == 401
        good = OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["tiny"]
    finally:
        s.close()


def test_metrics_count_requests_reuse_and_the_fork_cache(served):
    text = httpx.get(served.url + "/metrics").text
    for name in ("parsyn_queue_depth", "parsyn_batch_rows", "parsyn_fork_cache_bytes", "parsyn_ttft_seconds_bucket",
                 "parsyn_request_seconds_bucket", 'parsyn_prompt_tokens_total{kind="reused"}'):
        assert name in text, name


def test_the_command_serves_and_drains_in_flight_requests_on_sigterm(tiny_folder):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "parsyn.cli", "serve", "--model", str(tiny_folder), "--adapter",
                             "none", "--port", str(port)], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 300, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)  # mid-stream: this request still finishes
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and len(rest) > 10 and proc.wait(60) == 0
        assert proc.stderr.read().startswith(f"parsyn: serving {tiny_folder.name} at {url}")
    finally:
        proc.kill()
    with socket.create_server(("127.0.0.1", port)):
        busy = subprocess.run([sys.executable, "-m", "parsyn.cli", "serve", "--model", str(tiny_folder), "--port",
                               str(port)], capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2 and busy.stderr.strip().startswith(f"parsyn: error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in busy.stderr


def test_the_web_page_runs_workers_and_races_both_routes_in_a_real_browser(served, tmp_path):
    from selenium.webdriver.common.by import By

    driver = chromium()
    try:
        run_page(driver, served.url + "/", {"workers": "2", "worker-tokens": "6", "answer-tokens": "6", "roles": ""},
                 timeout_s=60)
        assert driver.find_element(By.ID, "status").text == ""
        assert len(driver.find_elements(By.CSS_SELECTOR, "#branches .branch")) == 2
        assert all(b.text.strip() for b in driver.find_elements(By.CSS_SELECTOR, "#branches .branch .text"))
        for route in ("cache", "text"):
            assert driver.find_element(By.ID, f"timer-{route}").text.startswith("TTFT ")
            assert driver.find_element(By.CSS_SELECTOR, f"#answer-{route} .text").text.strip()
            bars = driver.find_elements(By.CSS_SELECTOR, f"#answer-{route} .provenance span")
            assert bars and {b.get_attribute("class") for b in bars} <= {"reused", "rerotated", "mapped", "recomputed"}
        cache = driver.find_elements(By.CSS_SELECTOR, "#answer-cache .provenance span")
        classes = {b.get_attribute("class") for b in cache}
        assert "rerotated" in classes or "reused" in classes  # the cache route read branch K/V
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        driver.quit()


def test_a_route_that_fails_after_another_started_leaves_no_rows_behind(served):
    long = ["word " * 1400] * 3  # the text route's prompt passes the tiny model's 4096 positions, the cache's not
    f = httpx.post(served.url + "/v1/forks", json={"question": QUESTION, "branches": long}, timeout=60).json()
    r = httpx.post(f"{served.url}/v1/forks/{f['id']}/synthesize", json={"route": "both", "max_tokens": 500},
                   timeout=60)
    assert r.status_code == 400 and "positions" in r.json()["error"]["message"]
    deadline = time.time() + 10
    while served.engine.rows and time.time() < deadline:
        time.sleep(0.02)
    assert served.engine.rows == 0 and not served.engine.active
    alone = httpx.post(f"{served.url}/v1/forks/{f['id']}/synthesize", json={"route": "cache", "max_tokens": 4})
    assert alone.status_code == 200
