"""Route "auto" served over real HTTP: the server's gate decides each request as the library's
`synthesize_auto` does on the same branches (same choice, same risk, same tokens), raw and trained."""

from __future__ import annotations

import json
from contextlib import contextmanager

import httpx2 as httpx
import pytest
from conftest import random_synthesizer, tiny_lm
from openai import OpenAI
from page_screenshot import chromium, run_page

from parsyn import adapter as A
from parsyn.auto import Gate, synthesize_auto
from parsyn.mapper import MapperConfig
from parsyn.sampling import SamplingParams
from parsyn.serve.api import create_app
from parsyn.serve.engine import Engine
from parsyn.serve.local import LocalServer
from parsyn.workers import from_texts

QUESTION = "Which city hosts the meeting?"
BRANCHES = ["The meeting is in Paris.", "It starts at ten.", "Bring a laptop."]
SAMPLING = SamplingParams(8)


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_lm("llama", tokenizer)


@pytest.fixture(scope="module")
def trained_lm(tokenizer):
    lm = tiny_lm("qwen2", tokenizer, seed=3)
    return lm, random_synthesizer(lm, A.AdapterConfig(rank=4, alpha=8, mapper=MapperConfig(kind="affine")))


@contextmanager
def serving(lm, gate, synthesizer=None):
    engine = Engine(lm, synthesizer, max_queue=8).start()
    server = LocalServer(create_app(lm, model_name="tiny", synthesizer=synthesizer, engine=engine, gate=gate))
    try:
        yield server.start().url
    finally:
        server.stop()
        engine.stop()


def events(response) -> list:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def synthesized(url: str, **body) -> httpx.Response:
    fid = httpx.post(url + "/v1/forks", json={"question": QUESTION, "branches": BRANCHES}).json()["id"]
    return httpx.post(f"{url}/v1/forks/{fid}/synthesize", json={"route": "auto", "max_tokens": 8, **body}, timeout=60)


@pytest.mark.parametrize("gate, choice", [
    (Gate(cache_below=2, recompute_below=2), "cache"),
    (Gate("layouts", cache_below=0, recompute_below=2, recompute=3), "recompute"),
    (Gate(cache_below=0, recompute_below=0), "text"),
])
def test_each_choice_over_http_is_the_library_auto_route(lm, gate, choice):
    want, decision = synthesize_auto(lm, from_texts(lm, QUESTION, BRANCHES), gate, sampling=SAMPLING)
    with serving(lm, gate) as url:
        got = synthesized(url).json()["answers"]["auto"]
        streamed = events(synthesized(url, stream=True))
    assert decision["choice"] == choice == got["gate"]["choice"] and got["gate"]["signal"] == gate.signal
    assert got["gate"]["risk"] == pytest.approx(decision["risk"], abs=1e-5)
    assert got["answer"] == want.answer and got["route"] == want.route and got["prefill_tokens"] == want.prefill_tokens
    assert got["cached_tokens"] > 0 if choice != "text" else got["cached_tokens"] == 0
    assert "".join(e["delta"] for e in streamed[:-1]).strip() == want.answer
    assert {e["route"] for e in streamed[:-1]} == {"auto"}
    assert streamed[-1]["answers"]["auto"]["gate"]["choice"] == choice


@pytest.mark.parametrize("cache_below, choice", [(2.0, "cache"), (0.0, "text")])
def test_a_trained_gate_runs_the_engines_synthesizer_only_on_the_cache_route(trained_lm, cache_below, choice):
    lm, trained = trained_lm
    gate = Gate(cache_below=cache_below, recompute_below=cache_below, trained=True)
    want, _ = synthesize_auto(lm, from_texts(lm, QUESTION, BRANCHES), gate, sampling=SAMPLING, synthesizer=trained)
    with serving(lm, gate, trained) as url:
        got = synthesized(url).json()["answers"]["auto"]
        untrained = synthesized(url, adapter="none")
    assert got["gate"]["choice"] == choice and got["answer"] == want.answer and got["layout"] == want.layout
    assert untrained.status_code == 400
    assert "calibrated with a trained synthesizer" in untrained.json()["error"]["message"]


def test_chat_completions_take_route_auto_and_bad_uses_get_one_clear_error(lm):
    gate = Gate(cache_below=2, recompute_below=2)
    with serving(lm, gate) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        options = {"workers": 2, "route": "auto", "worker_max_tokens": 5}
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=6, temperature=0, extra_body={"parsyn": options})
        assert set(r.parsyn["answers"]) == {"auto"} and r.parsyn["answers"]["auto"]["gate"]["choice"] == "cache"
        assert r.choices[0].message.content == r.parsyn["answers"]["auto"]["answer"]
        laid = synthesized(url, layout="sequential")
        assert laid.status_code == 400 and "layout does not apply to route auto" in laid.json()["error"]["message"]
    with serving(lm, None) as url:
        none = synthesized(url)
        assert none.status_code == 400 and "--gate FILE" in none.json()["error"]["message"]
    with pytest.raises(ValueError, match="calibrated on Qwen, not tiny-llama"):
        create_app(lm, model_name="tiny", engine=Engine(lm), gate=Gate(model="Qwen"))


def test_the_web_page_shows_the_gates_choice_where_the_server_has_one(lm):
    from selenium.webdriver.common.by import By

    driver = chromium()
    try:
        for gate in (Gate(cache_below=0, recompute_below=0), None):
            with serving(lm, gate) as url:
                run_page(driver, url + "/", {"workers": "2", "worker-tokens": "5", "answer-tokens": "5", "roles": ""},
                         timeout_s=60)
                assert driver.find_element(By.ID, "status").text == ""
                auto = driver.find_element(By.ID, "answer-auto")
                assert auto.is_displayed() == (gate is not None)
                if gate is not None:
                    assert auto.find_element(By.CLASS_NAME, "gate").text.endswith("(confidence) → text")
                    assert driver.find_element(By.ID, "timer-auto").text.startswith("TTFT ")
                    assert auto.find_element(By.CLASS_NAME, "text").text.strip()
    finally:
        driver.quit()
