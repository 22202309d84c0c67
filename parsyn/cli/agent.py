"""`parsyn agent`: tool-using workers on a question, then a synthesis of their branches (final answers or
whole trajectories) by text, by cache, or both."""

from __future__ import annotations

import json
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.panel import Panel

from .common import MODEL_HELP, Layout, Route, app, err, load_model
from .run import _as_dict, _show, _synthesize

TOOL_NAMES = ("python", "sql", "search", "calculator")


class Handover(str, Enum):
    final = "final"
    trajectory = "trajectory"


def toolbox(names: str, db: Optional[Path], docs: Optional[Path]):
    """The tools named in `names` (comma-separated); sql needs --db, search --docs. Checked before any model
    loads: an unknown name, a missing file or a malformed corpus is one error."""
    from ..tools import Toolbox, calculator_tool, python_tool, search_tool, sql_tool

    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in TOOL_NAMES]
    if unknown or not chosen:
        raise ValueError(f"unknown tool {', '.join(unknown) or '(none given)'}; choose from {', '.join(TOOL_NAMES)}")
    if "sql" in chosen and db is None:
        raise ValueError("the sql tool needs --db FILE (a SQLite database, opened read-only)")
    if "search" in chosen and docs is None:
        raise ValueError("the search tool needs --docs PATH (a folder of text files or a JSONL file)")
    make = {"python": python_tool, "calculator": calculator_tool, "sql": lambda: sql_tool(db),
            "search": lambda: search_tool(docs)}
    return Toolbox([make[n]() for n in dict.fromkeys(chosen)])


@app.command()
def agent(
    question: Annotated[str, typer.Argument(help="The question every agent works on.")],
    tools: Annotated[str, typer.Option(help=f"Comma-separated tools: {', '.join(TOOL_NAMES)}.")] = "calculator",
    db: Annotated[Optional[Path], typer.Option(help="SQLite database for the sql tool (read-only).")] = None,
    docs: Annotated[Optional[Path], typer.Option(help="Folder of .txt/.md files or a JSONL file for search.")] = None,
    workers: Annotated[int, typer.Option("--workers", "-n", help="Number of parallel agents.")] = 3,
    role: Annotated[Optional[list[str]], typer.Option("--role", help="A role instruction per agent (repeat).")] = None,
    handover: Annotated[Handover, typer.Option(
        help="What the synthesizer reads of each agent: its final turn, or its whole trajectory.")] = Handover.final,
    route: Annotated[Route, typer.Option(help="Synthesis route (auto is not offered for agents yet).")] = Route.both,
    layout: Annotated[Optional[Layout], typer.Option(help="Position layout of the cache route.")] = None,
    max_turns: Annotated[int, typer.Option(help="Tool turns each agent may take.")] = 4,
    synth_tool_turns: Annotated[int, typer.Option(
        help="Tool turns the synthesizer may take itself (0: it answers from the branches alone).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens each agent samples over all its turns.")] = 256,
    answer_tokens: Annotated[int, typer.Option(help="Token limit of the synthesized answer.")] = 128,
    temperature: Annotated[float, typer.Option(help="Agents' sampling temperature (0: greedy).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    system: Annotated[Optional[str], typer.Option(help="System prompt of the shared prefix.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP)] = None,
    adapter: Annotated[str, typer.Option(
        help="Trained synthesizer for the cache route: auto, none, or a checkpoint folder.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object, with every turn.")] = False,
) -> None:
    """Run tool-using agents on QUESTION, then synthesize their branches."""
    from ..agents import run_agents
    from ..sampling import SamplingParams

    if not question.strip():
        raise ValueError("the question is empty")
    if workers < 1 or max_turns < 0 or synth_tool_turns < 0:
        raise ValueError(f"need at least one worker and tool turns >= 0, got {workers} workers, --max-turns "
                         f"{max_turns} and --synth-tool-turns {synth_tool_turns}")
    if route == Route.auto:
        raise ValueError("--route auto is not offered for agents yet; choose text, cache or both")
    box = toolbox(tools, db, docs)
    sampling = SamplingParams(max_new_tokens, temperature, 0.95 if temperature else 1.0, seed)
    lm = load_model(model)
    from ..adapter import resolve

    trained = resolve(lm, adapter)
    on_turn = None if as_json else _turn_view()
    run = run_agents(lm, question, box, workers=workers, roles=role or [], system=system, sampling=sampling,
                     max_turns=max_turns, handover=handover.value, on_turn=on_turn)
    results, calls = _synthesize_with_tools(lm, run.fork, route, layout.value if layout else None,
                                            SamplingParams(answer_tokens, 0.0, 1.0, seed), trained, box,
                                            synth_tool_turns)
    if as_json:
        report = _as_dict(run.fork, results, lm.name)
        report["handover"] = run.handover
        report["agents"] = [_trajectory(t) for t in run.trajectories]
        report["synthesizer_turns"] = {r: [_turn(t) for t in turns] for r, turns in calls.items()}
        print(json.dumps(report, indent=2))
    else:
        for r, turns in calls.items():
            for i, t in enumerate(turns, 1):
                err.print(_turn_panel(t, f"synthesizer ({r}) · tool turn {i}"))
        _show(run.fork, results, trained=trained is not None)


def _synthesize_with_tools(lm, f, route, layout, sampling, trained, box, turns) -> tuple[dict, dict]:
    """{route: Synthesis} and {route: the synthesizer's own tool turns}: with `turns` > 0 it may call the
    agents' tools itself; with none it answers from the branches (and has no tool turns)."""
    from ..agents.loop import AGENT_INSTRUCTION, TOOL_INSTRUCTION
    from ..conversation import Conversation

    if not turns:
        return _synthesize(lm, f, route, layout, None, sampling, trained, AGENT_INSTRUCTION)[0], {}

    results, calls = {}, {}
    for r in ["text", "cache"] if route == Route.both else [route.value]:
        cache = r == "cache"
        chat = Conversation(lm, f, route=r, layout=layout if cache else None, synthesizer=trained if cache else None,
                            tools=box, max_tool_turns=turns, sampling=sampling, instruction=TOOL_INSTRUCTION)
        results[r] = chat.ask()
        calls[r] = chat.tool_turns[-1]
    return results, calls


def _turn_view():
    """on_turn for the live view: each agent turn as it ends, its text, then each call with its result
    (cut for the screen), on stderr."""
    counts: dict[int, int] = {}

    def show(worker: int, turn) -> None:
        counts[worker] = counts.get(worker, 0) + 1
        err.print(_turn_panel(turn, f"agent {worker + 1} · turn {counts[worker]}"))

    return show


def _turn_panel(turn, title: str) -> Panel:
    """A turn's text, then each call with its result (cut for the screen)."""
    body = [escape(turn.text.strip() or "(empty)")]
    for call, result in zip(turn.calls, turn.results):
        shown = result.text if len(result.text) <= 400 else result.text[:400] + f" … ({len(result.text)} chars)"
        body.append(f"[bold]→ {escape(call.name or '?')}[/bold] [dim]{escape(_args(call.arguments))}[/dim]\n"
                    f"[{'green' if result.ok else 'red'}]{escape(shown)}[/]")
    return Panel("\n".join(body), title=title, title_align="left", border_style="dim")


def _args(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _trajectory(t) -> dict:
    return {"role": t.role, "stopped": t.stopped, "generated": t.generated, "tool_s": t.tool_s, "answer": t.answer,
            "turns": [_turn(turn) for turn in t.turns]}


def _turn(turn) -> dict:
    return {"text": turn.text, "calls": [asdict(c) for c in turn.calls], "results": [asdict(r) for r in turn.results]}

