"""The HTTP side: an OpenAI-compatible API, fork handles, metrics and the web page, over the engine.

Handlers only exchange messages with the engine thread (`Bridge`): they validate, submit a job, then
wait for its events or stream them as server-sent events. A client that goes away cancels its request
(its rows leave the batch at the next step). Errors are OpenAI-shaped JSON, never a traceback."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from ..auto import Gate, check_gate
from ..chat import DEFAULT_INSTRUCTION
from ..model import LM
from ..sampling import SamplingParams
from ..workers import Fork
from . import completions as C
from . import jobs
from . import schemas as S
from .bridge import APIError, Bridge, Limits, error_body, failure, streamed
from .engine import Engine
from .forks import ForkGone, ForkStore
from .metrics import Metrics

STATIC = resources.files("parsyn.serve") / "static"


@dataclass(eq=False)
class Context:
    lm: LM
    model_name: str
    synthesizer: object
    engine: Engine
    store: ForkStore
    metrics: Metrics
    limits: Limits
    api_key: str | None
    gate: Gate | None = None


def create_app(lm: LM, *, model_name: str, synthesizer=None, engine: Engine | None = None,
               store: ForkStore | None = None, api_key: str | None = None, limits: Limits | None = None,
               gate: Gate | None = None) -> FastAPI:
    """The app over a started engine (one is made and started when none is given); `gate` serves route "auto"."""
    if gate is not None:
        check_gate(gate, lm, synthesizer)
    engine = Engine(lm, synthesizer).start() if engine is None else engine
    store = ForkStore(2 << 30) if store is None else store
    ctx = Context(lm, model_name, synthesizer, engine, store, Metrics(engine, store), limits or Limits(), api_key, gate)
    app = FastAPI(title="parsyn", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.store = engine, store
    _errors(app)
    _guard(app, ctx)
    _openai_routes(app, ctx)
    _fork_routes(app, ctx)
    app.mount("/", StaticFiles(directory=str(STATIC), html=True), name="page")
    return app


def _errors(app: FastAPI) -> None:
    """Every error as OpenAI-shaped JSON."""
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.code), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        message = "unknown field" if first.get("type") == "extra_forbidden" else first.get("msg", "invalid")
        if first.get("type") == "json_invalid":
            where, message = "body", "malformed JSON"
        return JSONResponse(error_body(f"{where}: {message}", "invalid_request_error", first.get("type")), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), e.status_code)

    @app.exception_handler(Exception)
    async def _crash(_, e: Exception):
        f = failure(e)
        return JSONResponse(error_body(f.message, f.kind, f.code), f.status)


def _guard(app: FastAPI, ctx: Context) -> None:
    """The API key, the body size limit, and request metrics."""
    app.add_middleware(Guard, ctx=ctx)


class Guard:
    """ASGI middleware (plain ASGI, not Starlette's BaseHTTPMiddleware, which relays every streamed chunk
    through a stream of its own): refuses a missing key (401) or an oversized body (413) before the app
    runs, and records each request's status and time to its last byte."""

    def __init__(self, app, ctx: Context):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ctx, path = self.ctx, scope["path"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = None
        if ctx.api_key and path != "/healthz" and headers.get("authorization") != f"Bearer {ctx.api_key}":
            refusal = JSONResponse(error_body("a valid API key is needed (Authorization: Bearer KEY)",
                                              "authentication_error", "invalid_api_key"), 401)
        size = headers.get("content-length")
        if refusal is None and size is not None and (not size.isdigit() or int(size) > ctx.limits.max_body_bytes):
            refusal = JSONResponse(error_body(f"the request body is over {ctx.limits.max_body_bytes} bytes",
                                              "invalid_request_error", "body_too_large"), 413)
        if refusal is not None:
            return await refusal(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def timed(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                ctx.metrics.request(path, status[0], time.perf_counter() - t0)

        await self.app(scope, receive, timed)


def _openai_routes(app: FastAPI, ctx: Context) -> None:
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": ctx.model_name, "queue": ctx.engine.queue_depth, "rows": ctx.engine.rows,
                "gate": ctx.gate is not None}

    @app.get("/metrics")
    async def prometheus():
        body, kind = ctx.metrics.render()
        return Response(body, media_type=kind)

    @app.get("/v1/models")
    async def models():
        model = {"id": ctx.model_name, "object": "model", "created": 0, "owned_by": "parsyn"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: S.ChatRequest, http: Request):
        if body.model is not None and body.model != ctx.model_name:
            raise APIError(404, f"model {body.model!r} is not served here (this server serves {ctx.model_name!r})",
                           "not_found_error", "model_not_found")
        sampling = _sampling(body, ctx.limits, default_temperature=1.0)
        if body.parsyn is None:
            job = jobs.chat(ctx.lm, [m.model_dump(exclude_none=True) for m in body.messages], sampling, body.n)
            return await C.chat(http, ctx.engine, job, body, ctx.model_name, ctx.limits, ctx.metrics)
        question, system = _question(body.messages)
        if body.n != 1:
            raise APIError(400, "n must be 1 with parsyn workers (the workers are the parallel rows)")
        p = body.parsyn
        roles = _roles(p.roles, p.workers)
        routes = ["cache", "text"] if p.route == "both" else [p.route]
        job = jobs.workflow(ctx.lm, question, system=system, roles=roles,
                            worker_sampling=SamplingParams(p.worker_max_tokens, p.worker_temperature, 0.95,
                                                           sampling.seed),
                            routes=routes, sampling=sampling, layout=p.layout,
                            instruction=p.instruction or DEFAULT_INSTRUCTION, synthesizer=ctx.synthesizer, emit=_ignore,
                            executor=ctx.engine.executor, gate=_gate(ctx, p.route, p.layout, ctx.synthesizer))
        return await C.workflow(http, ctx.engine, job, body, routes, ctx.model_name, ctx.limits, ctx.metrics)


def _fork_routes(app: FastAPI, ctx: Context) -> None:
    @app.post("/v1/forks")
    async def create_fork(body: S.ForkRequest, http: Request):
        if body.branches is not None and body.workers is not None:
            raise APIError(400, "give either workers or branches, not both")
        if body.branches is not None:
            roles = _roles(body.roles, len(body.branches))
            job = jobs.given(ctx.lm, body.question, body.branches, system=body.system, roles=roles)
        else:
            workers = body.workers or 3
            sampling = _sampling(body, ctx.limits, default_temperature=0.7, default_max=128)
            job = jobs.workers(ctx.lm, body.question, system=body.system, roles=_roles(body.roles, workers),
                               sampling=sampling, emit=_ignore, executor=ctx.engine.executor)
        bridge = Bridge(ctx.engine, job, ctx.limits.timeout_s)
        if not body.stream:
            fork = await bridge.result(http)
            return _fork_object(ctx.store.put(fork), fork, ctx.store)
        return await streamed(http, bridge, lambda e: {"object": "fork.chunk", "branch": e[1][1], "delta": e[2].text},
                               lambda fork: _fork_object(ctx.store.put(fork), fork, ctx.store))

    @app.get("/v1/forks/{fork_id}")
    async def get_fork(fork_id: str):
        return _fork_object(fork_id, _stored(ctx.store, fork_id), ctx.store)

    @app.delete("/v1/forks/{fork_id}")
    async def delete_fork(fork_id: str):
        _stored(ctx.store, fork_id)
        ctx.store.delete(fork_id)
        return {"id": fork_id, "object": "fork", "deleted": True}

    @app.post("/v1/forks/{fork_id}/branches")
    async def add_branch(fork_id: str, body: S.BranchRequest, http: Request):
        fork = _stored(ctx.store, fork_id)
        if len(fork.branches) >= S.MAX_WORKERS:
            raise APIError(400, f"a fork holds at most {S.MAX_WORKERS} branches")
        job = jobs.extend(ctx.lm, fork, body.text, body.role)
        bigger = await Bridge(ctx.engine, job, ctx.limits.timeout_s).result(http)
        return _fork_object(ctx.store.put(bigger, fork_id), bigger, ctx.store)

    @app.post("/v1/forks/{fork_id}/synthesize")
    async def synthesize(fork_id: str, body: S.SynthesizeRequest, http: Request):
        fork = _stored(ctx.store, fork_id)
        sampling = _sampling(body, ctx.limits, default_temperature=0.0)
        routes = ["cache", "text"] if body.route == "both" else [body.route]
        synthesizer = ctx.synthesizer if body.adapter == "auto" else None
        job = jobs.synthesize(ctx.lm, fork, routes, sampling=sampling, layout=body.layout,
                              instruction=body.instruction or DEFAULT_INSTRUCTION, synthesizer=synthesizer,
                              gate=_gate(ctx, body.route, body.layout, synthesizer))
        bridge = Bridge(ctx.engine, job, ctx.limits.timeout_s)

        def finished(answers):
            ctx.metrics.synthesized(answers, fork)
            return {"id": fork_id, "object": "fork.synthesis", "model": ctx.model_name,
                    "answers": {r: C.answer(a, fork) for r, a in answers.items()}}

        if not body.stream:
            return finished(await bridge.result(http))
        return await streamed(http, bridge, lambda e: {"object": "fork.synthesis.chunk", "route": e[1],
                                                        "delta": e[2].text}, finished)


def _ignore(_event) -> None:
    pass


def _gate(ctx: Context, route: str, layout: str | None, synthesizer) -> Gate | None:
    """The server's gate for route "auto" (None for other routes), refused where it cannot run."""
    if route != "auto":
        return None
    if ctx.gate is None:
        raise APIError(400, "route auto needs a server started with --gate FILE (make one with `parsyn calibrate`)")
    if layout is not None:
        raise APIError(400, "layout does not apply to route auto: its gate was calibrated on one layout")
    check_gate(ctx.gate, ctx.lm, synthesizer)
    return ctx.gate


def _stored(store: ForkStore, fork_id: str) -> Fork:
    try:
        return store.get(fork_id)
    except ForkGone as gone:
        raise failure(gone) from None


def _sampling(body: S.Sampling, limits: Limits, *, default_temperature: float, default_max: int | None = None):
    given = body.max_completion_tokens or body.max_tokens
    temperature = body.temperature if "temperature" in body.model_fields_set else default_temperature
    return SamplingParams(given or default_max or limits.default_max_tokens, temperature, body.top_p,
                          body.seed if body.seed is not None else 0, body.stops())


def _question(messages: list[S.Message]) -> tuple[str, str | None]:
    roles = [m.role for m in messages]
    if roles not in (["user"], ["system", "user"]):
        raise APIError(400, "parsyn workers take one user message (the question), after an optional system message")
    return messages[-1].content, messages[0].content if roles[0] == "system" else None


def _roles(roles: list[str] | None, workers: int) -> list[str | None]:
    if roles is None:
        return [None] * workers
    if len(roles) != workers:
        raise APIError(400, f"got {len(roles)} roles for {workers} workers; give one role per worker or none")
    return list(roles)


def _fork_object(fork_id: str, fork: Fork, store: ForkStore) -> dict:
    info = store.info(fork_id)
    return {"id": fork_id, "object": "fork", **C.fork_summary(fork), "system": fork.system, "bytes": info["bytes"],
            "expires_in_s": round(info["expires_in_s"])}


