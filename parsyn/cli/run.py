"""`parsyn run`: fork workers on a question and synthesize their branches by text, by cache, or both."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .common import MODEL_HELP, Layout, Route, app, err, load_model, out


@app.command()
def run(
    question: Annotated[str, typer.Argument(help="The question every worker answers.")],
    workers: Annotated[int, typer.Option("--workers", "-n", help="Number of parallel workers.")] = 3,
    quorum: Annotated[Optional[int], typer.Option(
        help="Synthesize once this many workers have finished; the others are cut.")] = None,
    deadline: Annotated[Optional[float], typer.Option(
        help="Seconds of worker decoding after which the finished workers are synthesized and the rest cut.")] = None,
    fold: Annotated[bool, typer.Option(
        help="With --quorum or --deadline: after the early answer, let the cut workers finish and synthesize "
             "again over every branch.")] = False,
    role: Annotated[Optional[list[str]], typer.Option("--role", help="A role instruction per worker (repeat).")] = None,
    branch: Annotated[Optional[list[str]], typer.Option(
        "--branch", help="A ready branch text instead of running workers (repeat).")] = None,
    route: Annotated[Route, typer.Option(help="Synthesis route (auto: the calibrated gate of --gate).")] = Route.both,
    gate: Annotated[Optional[Path], typer.Option(help="Gate file of `parsyn calibrate`, for --route auto.")] = None,
    layout: Annotated[Optional[Layout], typer.Option(
        help="Position layout of the cache route (default: the adapter's, else parallel).")] = None,
    keep: Annotated[float, typer.Option(
        help="Cache route: keep this fraction of each branch's tokens, those the synthesizer's prompt attends "
             "to most (1 keeps all).")] = 1.0,
    kv_bits: Annotated[Optional[int], typer.Option(help="Cache route: store branch K/V in 8 bits (8).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit for each worker and for the synthesizer.")] = 128,
    temperature: Annotated[float, typer.Option(
        help="Workers' sampling temperature (the synthesizer is greedy).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Workers' nucleus sampling mass.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    system: Annotated[Optional[str], typer.Option(help="System prompt of the shared prefix.")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help=MODEL_HELP)] = None,
    adapter: Annotated[str, typer.Option(
        help="Trained synthesizer for the cache route: auto (the packaged one when it fits the model), "
             "none, or a checkpoint folder.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the display.")] = False,
    ray: Annotated[Optional[str], typer.Option(help="Workers on Ray: HOST:PORT, auto or local (throwaway).")] = None,
    ray_actors: Annotated[int, typer.Option(help="Model replicas (Ray actors, one CPU each) for --ray.")] = 2,
) -> None:
    """Fork workers on QUESTION, then synthesize their branches by text, by cache, or both."""
    from ..adapter import resolve
    from ..sampling import SamplingParams
    from ..workers import from_texts

    worker_sampling = SamplingParams(max_new_tokens, temperature, top_p, seed)
    synth_sampling = SamplingParams(max_new_tokens, 0.0, 1.0, seed)
    _check_request(question, bool(branch), workers, quorum, deadline, fold, ray)  # before the model loads
    compression = _compression(keep, kv_bits, route)
    executor = _executor(ray, ray_actors, model, bool(branch), quorum, deadline)
    chosen_gate = _gate(route, gate)
    lm = load_model(model)
    trained = resolve(lm, adapter)  # a bad adapter is refused before any worker runs
    roles = role or []
    if branch:
        f = from_texts(lm, question, branch, roles=roles, system=system)
    elif executor is not None:
        f = _ray_fork(lm, executor, question, workers, roles, system, worker_sampling, quiet=as_json)
    else:
        f = _local_fork(lm, question, workers, roles, system, worker_sampling, quorum, deadline, fold, quiet=as_json)
    label = None if trained is None else adapter if adapter != "auto" else "auto (packaged)"
    _answer(lm, f, lambda fork: _synthesize(lm, fork, route, layout.value if layout else None, chosen_gate,
                                            synth_sampling, trained, compression=compression),
            fold=fold, as_json=as_json, adapter=label)


def _answer(lm, f, synthesize, *, fold: bool, as_json: bool, adapter: str | None) -> None:
    """Synthesize fork `f` and show it (or print JSON); with `fold`, `f` is an `Early` fork: its stragglers
    then finish and a second synthesis over every branch follows."""
    early, f = (f, f.fork) if fold else (None, f)
    results, decision = synthesize(f)
    if decision is not None and not as_json:
        err.print(f"auto: risk {decision['risk']:.3f} ({decision['signal']}) → {decision['choice']}")
    if not as_json:
        _show(f, results, trained=adapter is not None)
    folded = None
    if early is not None:  # the stragglers decode on after the early answer is out, then a follow-up synthesis
        late = ", ".join(str(i + 1) for i in f.cut)
        with err.status(f"folding in worker(s) {late}", spinner="dots"):
            full = early.rest()
        folded = (full, synthesize(full)[0])
        if not as_json:
            out.print(f"[bold]stragglers folded in[/bold]: worker(s) {late} finished")
            _show(full, folded[1], trained=adapter is not None, only=f.cut)
    if as_json:
        print(json.dumps({**_as_dict(f, results, lm.name), "auto": decision, "adapter": adapter,
                          **({"folded": _as_dict(*folded, lm.name)} if folded else {})}, indent=2))


def _check_fold(fold: bool, quorum: int | None, deadline: float | None, ray: str | None) -> None:
    if fold and quorum is None and deadline is None:
        raise ValueError("--fold folds in the workers a --quorum or --deadline join cut; give one of them")
    if fold and ray is not None:
        raise ValueError("--fold needs local workers; with --ray every worker is waited for")


def _check_request(question: str, given: bool, workers: int, quorum: int | None, deadline: float | None,
                   fold: bool = False, ray: str | None = None) -> None:
    """The question, the workers and the join (--quorum, --deadline, --fold), checked before the model loads."""
    _check_fold(fold, quorum, deadline, ray)
    if not question.strip():
        raise ValueError("the question is empty")
    if not given and workers < 1:
        raise ValueError(f"need at least one worker, got {workers}")
    if given and (quorum is not None or deadline is not None):
        raise ValueError("--quorum and --deadline join running workers; they do not apply to --branch")
    from ..workers import Join

    Join(quorum, deadline)
    if quorum is not None and quorum > workers:
        raise ValueError(f"a quorum of {quorum} needs at least {quorum} workers, got --workers {workers}")


def _local_fork(lm, question: str, workers, roles, system, sampling, quorum, deadline, fold: bool, *, quiet: bool):
    """The fork of the workers here, with a live bar per worker; a join's cut workers are named on stderr.
    With `fold`, an `Early` fork whose cut workers are suspended, not cut."""
    from ..stragglers import fork_early
    from ..workers import fork

    start = fork_early if fold else fork
    with _worker_progress(workers, sampling.max_new_tokens, quiet=quiet) as on_token:
        f = start(lm, question, workers=workers, roles=roles, system=system, sampling=sampling, on_token=on_token,
                  quorum=quorum, deadline_s=deadline)
    cut = f.fork.cut if fold else f.cut
    if cut and not quiet:
        err.print(f"join: synthesizing {workers - len(cut)} of {workers} workers; "
                  f"{'suspended' if fold else 'cut'} worker(s) {', '.join(str(i + 1) for i in cut)}")
    return f


def _ray_fork(lm, executor, question: str, workers, roles, system, sampling, *, quiet: bool):
    """The fork of --ray: workers on the executor's actors, which end with it (a local cluster too)."""
    from ..workers import fork

    where = executor.options
    with executor, err.status(f"{workers} workers on Ray ({where.address}, {where.actors} actors)", spinner="dots"):
        f = fork(lm, question, workers=workers, roles=roles, system=system, sampling=sampling, executor=executor)
    if not quiet:
        s = executor.last
        err.print(f"ray: {s.rows} workers on {s.actors} actors; {s.bytes_shipped / 2**20:.1f} MiB of K/V shipped, "
                  f"{s.remote_s:.1f} s" + (f"; retried: {'; '.join(s.retried)}" if s.retried else ""))
    return f


def _executor(address: str | None, actors: int, model: str | None, given: bool, quorum, deadline):
    """The Ray executor of --ray (None without it), checked before the model loads."""
    if address is None:
        return None
    if given:
        raise ValueError("--ray runs workers; it does not apply to --branch")
    if quorum is not None or deadline is not None:
        raise ValueError("--quorum and --deadline cut local workers; with --ray every worker is waited for")
    from ..dist import RayExecutor
    from ..dist.cluster import check_address, require
    from ..registry import default

    require()
    return RayExecutor(check_address(address), actors=actors, model=model or default())


def _compression(keep: float, kv_bits: int | None, route) -> dict:
    """The compression of --keep / --kv-bits as CacheOptions fields, checked before the model loads."""
    if keep == 1.0 and kv_bits is None:
        return {}
    from ..compress import Compression

    Compression(keep=keep, bits=kv_bits)
    if route in (Route.text, Route.auto):
        raise ValueError("--keep and --kv-bits compress the cache route's branches; use --route cache or both")
    return {"keep": keep, "kv_bits": kv_bits}


def _synthesize(lm, f, route, layout, gate, sampling, trained, instruction=None, *,
                compression: dict | None = None) -> tuple[dict, dict | None]:
    """{route name: Synthesis} by the routes asked for, and the auto gate's decision (None without it).
    `compression`: CacheOptions fields for the cache route (over the synthesizer's own settings)."""
    import dataclasses

    from ..chat import DEFAULT_INSTRUCTION
    from ..synthesis import settings, synthesize

    instruction = instruction or DEFAULT_INSTRUCTION
    if route == Route.auto:
        from ..auto import synthesize_auto

        s, decision = synthesize_auto(lm, f, gate, sampling=sampling, synthesizer=trained, instruction=instruction)
        return {"auto": s}, decision
    routes = ["text", "cache"] if route == Route.both else [route.value]
    options = dataclasses.replace(settings(trained, layout, None)[1], **compression) if compression else None
    return {r: synthesize(lm, f, route=r, layout=layout, sampling=sampling, synthesizer=trained,
                          instruction=instruction, options=options if r == "cache" else None) for r in routes}, None


def _gate(route, path: Optional[Path]):
    """The gate for --route auto, read before the model loads; --gate is refused with any other route."""
    if route != Route.auto:
        if path is not None:
            raise ValueError("--gate applies to --route auto only")
        return None
    if path is None:
        raise ValueError("--route auto needs --gate FILE (make one with `parsyn calibrate RESULTS --max-regress X`)")
    from ..auto import Gate

    return Gate.load(path)


def _as_dict(f, results, model_name: str) -> dict:
    report = {
        "question": f.question,
        "model": model_name,
        "branches": [
            {"role": b.role, "text": b.text, "tokens": len(b.token_ids), "generated": b.generated}
            for b in f.branches
        ],
        "cut": list(f.cut),
        "routes": {
            name: {
                "answer": s.answer, "layout": s.layout, "ttft_s": s.ttft_s, "total_s": s.total_s,
                "prefill_tokens": s.prefill_tokens, "provenance": [asdict(p) for p in s.provenance],
            }
            for name, s in results.items()
        },
    }
    if len(results) == 2:
        report["speedup"] = results["text"].ttft_s / results["cache"].ttft_s
    return report


class _worker_progress:
    """A live bar per worker while they decode; yields the on_token callback."""

    def __init__(self, workers: int, limit: int, quiet: bool):
        self.workers, self.limit, self.quiet = workers, limit, quiet

    def __enter__(self) -> Callable[[int, int], None] | None:
        if self.quiet or self.workers > 32:
            return None
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, transient=True)
        tasks = [self.progress.add_task(f"worker {i + 1}", total=self.limit) for i in range(self.workers)]
        self.progress.start()
        return lambda row, _token: self.progress.advance(tasks[row])

    def __exit__(self, *exc) -> None:
        if hasattr(self, "progress"):
            self.progress.stop()


def _show(f, results, *, trained: bool = False, only: tuple[int, ...] | None = None) -> None:
    """The branches (of workers `only`, when given: those folded in) and the synthesis table."""
    present = [i for i in range(len(f.branches) + len(f.cut)) if i not in f.cut]  # worker index of each branch
    for i, b in zip(present, f.branches):
        if only is not None and i not in only:
            continue
        title = f"worker {i + 1}" + (f" · {b.role}" if b.role else "") + f" · {len(b.token_ids)} tokens"
        out.print(Panel(b.text or "(empty)", title=title, title_align="left", border_style="dim"))
    table = Table(title="synthesis", title_justify="left")
    for column in ("route", "answer", "TTFT", "prefilled"):
        table.add_column(column)
    for name, s in results.items():
        label = name if s.layout is None else f"{name} ({s.layout}{', trained' if trained else ''})"
        table.add_row(label, s.answer, f"{s.ttft_s * 1000:.0f} ms", f"{s.prefill_tokens} tokens")
    out.print(table)
    if len(results) == 2:
        out.print(f"time to first token: cache route {results['text'].ttft_s / results['cache'].ttft_s:.1f}× faster "
                  f"than text synthesis")


