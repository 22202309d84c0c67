"""`parsyn serve`: the OpenAI-compatible server (see parsyn/serve)."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import MODEL_HELP, app, load_model


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help=MODEL_HELP)] = None,
    adapter: Annotated[str, typer.Option(
        help="auto (the packaged synthesizer when it fits the model), none, or a checkpoint folder.")] = "auto",
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests that may wait; more get 429.")] = 64,
    max_rows: Annotated[int, typer.Option(min=1, help="Rows decoding at once in the engine's batch.")] = 64,
    cache_gib: Annotated[float, typer.Option(min=0.001, help="Byte budget of stored forks (LRU eviction).")] = 2.0,
    fork_ttl: Annotated[float, typer.Option(min=1, help="Seconds an unused fork is kept.")] = 3600.0,
    timeout: Annotated[float, typer.Option(min=1, help="Deadline of a request in seconds, queue included.")] = 600.0,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="PARSYN_API_KEY", help="Require `Authorization: Bearer KEY` on every endpoint but /healthz.")] = None,
    ray: Annotated[Optional[str], typer.Option(
        help="Decode requests' worker rows on Ray actors: a cluster's HOST:PORT, auto, or local.")] = None,
    ray_actors: Annotated[int, typer.Option(help="Model replicas (Ray actors, one CPU each) for --ray.")] = 2,
    gate: Annotated[Optional[Path], typer.Option(
        help="Gate file of `parsyn calibrate`: serves route auto (the gate picks cache or text per request).")] = None,
) -> None:
    """Serve the model over an OpenAI-compatible API with fork handles, streaming and a web page."""
    import uvicorn

    from .. import registry
    from ..adapter import resolve
    from ..auto import Gate, check_gate
    from ..serve.api import Limits, create_app
    from ..serve.engine import Engine
    from ..serve.forks import ForkStore

    store = ForkStore(int(cache_gib * 2**30), fork_ttl)  # bad settings are refused before the model loads
    chosen_gate = Gate.load(gate) if gate is not None else None
    _check_port(host, port)
    executor = _executor(ray, ray_actors, model)
    lm = load_model(model)
    trained = resolve(lm, adapter)
    if chosen_gate is not None:
        check_gate(chosen_gate, lm, trained)  # before the engine starts
    name = model if model and model in registry.MODELS else (os.path.basename(model.rstrip("/")) if model
                                                             else registry.default())
    _start_actors(executor, lm)
    engine = Engine(lm, trained, max_queue=max_queue, max_rows=max_rows, executor=executor).start()
    web = create_app(lm, model_name=name, synthesizer=trained, engine=engine, store=store, api_key=api_key,
                     limits=Limits(timeout_s=timeout), gate=chosen_gate)
    server = uvicorn.Server(uvicorn.Config(web, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=int(timeout)))
    print(f"parsyn: serving {name} at http://{host}:{port} (synthesizer: {'none' if trained is None else adapter}); "
          "Ctrl-C or SIGTERM stops it after in-flight requests", file=sys.stderr, flush=True)
    # uvicorn takes SIGINT/SIGTERM while it runs (stop accepting, let in-flight requests finish) and raises
    # them again afterwards: ignored by then, so a drained stop exits 0
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        server.run()
    finally:
        engine.stop(drain=True)
        if executor is not None:
            executor.close()
    print("parsyn: the server stopped after its in-flight requests", file=sys.stderr)


def _executor(address: Optional[str], actors: int, model: Optional[str]):
    """The Ray executor of --ray (None without it), checked before the model loads."""
    if address is None:
        return None
    from .. import registry
    from ..dist import RayExecutor
    from ..dist.cluster import check_address, require

    require()
    return RayExecutor(check_address(address), actors=actors, model=model or registry.default())


def _start_actors(executor, lm) -> None:
    """The actors load their replicas before the first request; a failure ends them (and a local cluster)."""
    if executor is None:
        return
    try:
        executor.ready(lm)
    except BaseException:
        executor.close()
        raise


def _check_port(host: str, port: int) -> None:
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
