"""A research workflow over local documents: three agents search their own document folders (BM25), one
synthesis reads their whole trajectories, tool results included, from their caches.

    python examples/research_docs.py [--docs DIR ...]

Without --docs, three folders are written from the packaged SQuAD passages: the passage that answers the
question sits in one of them, among passages of other articles.
"""

import argparse
import random
import tempfile
from pathlib import Path

import parsyn
from parsyn import datasets
from parsyn.agents import AGENT_INSTRUCTION, run_agents
from parsyn.tools import Toolbox, search_tool


def write_folders(root: Path) -> tuple[str, list[Path]]:
    rows = datasets.squad("eval")
    rng = random.Random(1)
    target = rows[0]
    others = [r for r in rng.sample(rows, 12) if r["title"] != target["title"]][:8]
    folders = [root / f"shelf{i}" for i in range(3)]
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True)
        for j, r in enumerate(others[i::3]):
            (folder / f"{r['title']}-{j}.txt").write_text(r["passage"])
    (folders[2] / f"{target['title']}.txt").write_text(target["passage"])
    return target["question"], folders


TOKENS = 160


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, nargs="*")
    parser.add_argument("--question")
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=TOKENS, help="each agent's token budget")
    args = parser.parse_args()
    question, folders = args.question, args.docs
    if not folders:
        question, folders = write_folders(Path(tempfile.mkdtemp()))
    lm = parsyn.load(args.model)
    # the same tool (one description: the shared prefix offers it to all), a different shelf per agent
    about = "Search your documents by keywords and read the best matching passages."
    boxes = [Toolbox([search_tool(folder, k=2, description=about)]) for folder in folders]
    ask = f"{question}\n\nSearch the documents, then answer with a short phrase."
    run = run_agents(lm, ask, boxes, workers=len(boxes), max_turns=2, handover="trajectory",
                     sampling=parsyn.SamplingParams(max_new_tokens=args.tokens))
    for i, t in enumerate(run.trajectories, 1):
        print(f"agent {i} ({t.calls} searches): {t.answer[:200]}")
    for route in ("text", "cache"):
        s = parsyn.synthesize(lm, run.fork, route=route, instruction=AGENT_INSTRUCTION,
                              sampling=parsyn.SamplingParams(max_new_tokens=32))
        tools = sum(p.length for p in s.provenance if p.source == "tool")
        print(f"{route:5s} ({s.ttft_s * 1000:.0f} ms to first token, {tools} tool-result tokens read): {s.answer}")


if __name__ == "__main__":
    main()
