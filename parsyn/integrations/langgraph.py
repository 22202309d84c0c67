"""LangGraph: a fan-out of parsyn workers with `Send`, joined by a parsyn synthesis over their branches.

    graph = fork_join_graph(lm, route="cache")
    out = graph.invoke({"question": "Why is the sky blue?", "roles": ["Be brief.", "Explain the physics."]})
    out["answer"], out["branches"]           # the synthesis, and each worker's Branch (text and K/V)

Each `Send` runs one worker node (a one-worker fork on the shared question); the branches gather in the
state under an `operator.add` reducer, and the join node composes them (`workflow.gather`: the workers
saw the same prefix, so their K/V are placed as computed) and synthesizes by `route`. Branch texts from
any other node (e.g. another framework's LLM) may be added to `branches` as strings. The nodes are
plain functions (`worker_node`, `join_node`) for graphs of your own; give the nodes of one model one lock,
so that parallel Send branches take turns on it.
"""

from __future__ import annotations

import operator
import threading
from dataclasses import replace
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from ..model import LM
from ..sampling import SamplingParams, alone_seed
from ..synthesis import synthesize
from ..workers import WORKER_SAMPLING, fork
from ..workflow import gather


class ForkState(TypedDict, total=False):
    question: str
    roles: list[str]
    branches: Annotated[list, operator.add]   # Branch objects (or texts), in arrival order
    answer: str
    synthesis: Any                            # the parsyn Synthesis of the join


def fan_out(state: ForkState) -> list[Send]:
    """One `Send` to the worker node per role (at least one worker)."""
    roles = state.get("roles") or [None]
    return [Send("worker", {"question": state["question"], "role": r, "index": i}) for i, r in enumerate(roles)]


def worker_node(lm: LM, sampling: SamplingParams = WORKER_SAMPLING, *, lock: threading.Lock | None = None):
    """A node that runs one worker on {"question", "role", "index"} and adds its Branch to `branches`. Worker
    i samples with the seed a local `fork` gives its row i, so a graph's branches are a local fork's. Nodes
    that share a model share one `lock` (one forward at a time)."""
    lock = lock or threading.Lock()

    def worker(task: dict) -> dict:
        seeded = replace(sampling, seed=alone_seed(sampling.seed, task["index"]))
        roles = [task["role"]] if task.get("role") else []
        with lock:
            f = fork(lm, task["question"], workers=1, roles=roles, sampling=seeded)
        return {"branches": [f.branches[0]]}
    return worker


def join_node(lm: LM, *, sampling: SamplingParams | None = None, lock: threading.Lock | None = None, **route):
    """A node that synthesizes the state's `branches` on its `question`; `route` takes `synthesize`'s
    keyword arguments (route, layout, synthesizer, instruction, options)."""
    lock = lock or threading.Lock()

    def join(state: ForkState) -> dict:
        if not state.get("branches"):
            raise ValueError("the join node found no branches in the state")
        with lock:
            f = gather(lm, state["question"], state["branches"])
            s = synthesize(lm, f, **route, **({"sampling": sampling} if sampling else {}))
        return {"answer": s.answer, "synthesis": s}
    return join


def fork_join_graph(lm: LM, *, worker_sampling: SamplingParams = WORKER_SAMPLING,
                    sampling: SamplingParams | None = None, **route):
    """START → one worker per role (Send) → join → END, compiled."""
    g, lock = StateGraph(ForkState), threading.Lock()
    g.add_node("worker", worker_node(lm, worker_sampling, lock=lock))
    g.add_node("join", join_node(lm, sampling=sampling, lock=lock, **route))
    g.add_conditional_edges(START, fan_out, ["worker"])
    g.add_edge("worker", "join")
    g.add_edge("join", END)
    return g.compile()
