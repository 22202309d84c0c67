"""A code task: three agents write a function and run its tests in the python sandbox; one synthesis
picks up from their caches and writes the final function, which is then checked against the tests.

    python examples/code_with_tests.py
"""

import argparse

import parsyn
from parsyn.agents import AGENT_INSTRUCTION, run_agents
from parsyn.eval.tasks import extract_code
from parsyn.tools import Toolbox, python_tool
from parsyn.tools.sandbox import run as run_in_sandbox

TASK = "Write a Python function `second_largest(xs)` that returns the second largest distinct value of a list."
TESTS = "assert second_largest([3, 1, 4, 4, 2]) == 3\nassert second_largest([10, 9]) == 9\n"


TOKENS = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=TOKENS, help="each agent's token budget")
    args = parser.parse_args()
    lm = parsyn.load(args.model)
    question = (f"{TASK}\nYour code should pass these tests:\n{TESTS}\nYou may run code with the python tool "
                "(print what you want to see). End with the complete function in a ```python code block.")
    run = run_agents(lm, question, Toolbox([python_tool()]), workers=3, max_turns=2, handover="final",
                     roles=["Use sorted().", "Use a set.", "Loop once, keeping the two largest."],
                     sampling=parsyn.SamplingParams(max_new_tokens=args.tokens))
    for i, t in enumerate(run.trajectories, 1):
        print(f"agent {i}: {t.calls} runs, stopped by {t.stopped}")
    for route in ("text", "cache"):
        s = parsyn.synthesize(lm, run.fork, route=route, instruction=AGENT_INSTRUCTION,
                              sampling=parsyn.SamplingParams(max_new_tokens=args.tokens))
        code = extract_code(s.answer)
        passed = run_in_sandbox(f"{code}\n\n{TESTS}").passed
        print(f"{route:5s} ({s.ttft_s * 1000:.0f} ms to first token): tests {'pass' if passed else 'fail'}\n{code}\n")


if __name__ == "__main__":
    main()
