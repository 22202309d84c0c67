// The page uses only the public API: POST /v1/forks (workers, streamed), then
// POST /v1/forks/{id}/synthesize with route "both" (text and cache racing, streamed), then, where
// GET /healthz says the server has a gate, route "auto" on the same fork.
"use strict";
const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.authorization = "Bearer " + key;
  return h;
}

// POST body, then hand each server-sent event's JSON to onEvent; resolves at [DONE].
async function stream(path, body, onEvent) {
  const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!r.ok) {
    const e = await r.json().catch(() => ({}));
    throw new Error((e.error && e.error.message) || r.statusText);
  }
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      onEvent(event);
    }
  }
}

function branchBoxes(n, roles) {
  const box = $("branches");
  box.innerHTML = "";
  for (let i = 0; i < n; i++) {
    const a = document.createElement("article");
    a.className = "branch";
    a.id = "branch-" + i;
    a.innerHTML = "<h3></h3><div class='text'></div>";
    a.querySelector("h3").textContent = "worker " + (i + 1) + (roles[i] ? ": " + roles[i] : "");
    box.appendChild(a);
  }
}

function drawProvenance(el, spans) {
  el.innerHTML = "";
  const total = spans.reduce((s, p) => s + p.length, 0) || 1;
  for (const p of spans) {
    const bar = document.createElement("span");
    bar.className = p.how;
    bar.style.width = (100 * p.length / total) + "%";
    bar.title = p.source + (p.source === "branch" || p.source === "tool" ? " " + p.index : "") + ": " + p.length + " tokens, " + p.how;
    el.appendChild(bar);
  }
}

function timer(route, t0) {
  const el = $("timer-" + route);
  el.className = "timer";
  const tick = () => { el.textContent = ((performance.now() - t0) / 1000).toFixed(2) + " s"; };
  const id = setInterval(tick, 30);
  tick();
  return (seconds) => { clearInterval(id); el.textContent = "TTFT " + seconds.toFixed(2) + " s"; el.classList.add("done"); };
}

async function run(ev) {
  ev.preventDefault();
  $("go").disabled = true;
  $("status").textContent = "";
  $("answer-auto").querySelector(".gate").textContent = "";
  for (const r of ["cache", "text", "auto"]) {
    $("answer-" + r).querySelector(".text").textContent = "";
    $("answer-" + r).querySelector(".provenance").innerHTML = "";
    $("timer-" + r).textContent = "–";
  }
  const workers = Number($("workers").value);
  const roles = $("roles").value.split("\n").map((s) => s.trim()).filter(Boolean);
  try {
    if (roles.length && roles.length !== workers) throw new Error("give one role per worker, or none");
    branchBoxes(workers, roles);
    let fork = null;
    await stream("v1/forks", { question: $("question").value, workers, roles: roles.length ? roles : null,
      max_tokens: Number($("worker-tokens").value), stream: true }, (e) => {
      if (e.object === "fork.chunk") $("branch-" + e.branch).querySelector(".text").textContent += e.delta;
      if (e.object === "fork") fork = e;
    });
    const t0 = performance.now();
    const stop = { cache: timer("cache", t0), text: timer("text", t0) };
    const first = {};
    const body = { route: "both", max_tokens: Number($("answer-tokens").value), stream: true };
    if ($("layout").value) body.layout = $("layout").value;
    await stream("v1/forks/" + fork.id + "/synthesize", body, (e) => {
      if (e.object === "fork.synthesis.chunk") {
        if (!first[e.route]) { first[e.route] = true; stop[e.route]((performance.now() - t0) / 1000); }
        $("answer-" + e.route).querySelector(".text").textContent += e.delta;
      }
      if (e.object === "fork.synthesis") finished(e.answers, first, stop);
    });
    if (await hasGate) await gated(fork.id);
    $("status").textContent = "";
    document.body.dataset.done = "1";
  } catch (err) {
    $("status").textContent = err.message;
  } finally {
    $("go").disabled = false;
  }
}

function finished(answers, first, stop) {
  for (const [route, a] of Object.entries(answers)) {
    if (!first[route]) stop[route](a.ttft_s);
    $("timer-" + route).textContent = "TTFT " + a.ttft_s.toFixed(2) + " s";
    $("answer-" + route).querySelector(".text").textContent = a.answer;
    drawProvenance($("answer-" + route).querySelector(".provenance"), a.provenance);
    if (a.gate) {
      $("answer-auto").querySelector(".gate").textContent =
        "risk " + a.gate.risk.toFixed(3) + " (" + a.gate.signal + ") → " + a.gate.choice;
    }
  }
}

// Route "auto" on the same fork: the server's gate picks cache, recompute or text.
async function gated(forkId) {
  const t0 = performance.now();
  const stop = { auto: timer("auto", t0) };
  const first = {};
  const body = { route: "auto", max_tokens: Number($("answer-tokens").value), stream: true };
  await stream("v1/forks/" + forkId + "/synthesize", body, (e) => {
    if (e.object === "fork.synthesis.chunk") {
      if (!first.auto) { first.auto = true; stop.auto((performance.now() - t0) / 1000); }
      $("answer-auto").querySelector(".text").textContent += e.delta;
    }
    if (e.object === "fork.synthesis") finished(e.answers, first, stop);
  });
}

// Whether the server has a gate (GET /healthz): the auto panel shows only then.
const hasGate = fetch("healthz").then((r) => r.json()).then((h) => Boolean(h.gate)).catch(() => false);
hasGate.then((yes) => { $("answer-auto").hidden = !yes; });
$("ask").addEventListener("submit", run);
