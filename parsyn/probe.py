"""Facts spread over branches: a generator for training items and for the retrieval probe.

Each item has 2-4 branches holding 1-3 facts each (a subject appears once per relation); the question
asks for one fact, whose value is the gold answer. Values are drawn so that every branch holds values of
the same kinds: an answer from the wrong branch is a plausible-looking wrong answer. Training and probe
items come from disjoint seed ranges; `seed` fully determines an item.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jonas", "Kira", "Liam",
         "Maya", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wes", "Xenia",
         "Yusuf", "Zoe", "Anton", "Bea", "Cyril", "Dina")
CITIES = ("Oslo", "Lima", "Cairo", "Perth", "Quito", "Riga", "Tunis", "Hanoi", "Dakar", "Bern", "Porto",
          "Seoul", "Dublin", "Nairobi", "Lyon", "Kyoto", "Boston", "Madrid", "Prague", "Austin")
FOODS = ("pizza", "sushi", "tacos", "pasta", "curry", "dumplings", "pancakes", "soup", "salad", "noodles",
         "burgers", "risotto", "falafel", "paella", "waffles", "kebab", "ramen", "omelette")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "pink", "brown", "teal")
ANIMALS = ("cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "lizard", "ferret", "pony")
OBJECTS = ("bicycle", "door", "kite", "boat", "lamp", "chair", "fence", "mailbox", "umbrella", "guitar")
CODE_PARTS = ("ka", "lo", "mi", "ru", "ten", "zor", "bel", "quo", "vin", "sa", "dor", "pex", "lum", "tri")

# (kind, fact template, question templates); {s} subject, {v} value
RELATIONS = (
    ("food", "{s}'s favorite food is {v}.", ("What is {s}'s favorite food?", "Which food does {s} like most?")),
    ("city", "{s} lives in {v}.", ("Where does {s} live?", "In which city does {s} live?")),
    ("pet", "{s} has a pet {v}.", ("What pet does {s} have?", "Which animal is {s}'s pet?")),
    ("color", "The {s} is painted {v}.", ("What color is the {s}?", "Which color is the {s} painted?")),
    ("code", "The password for {s} is {v}.", ("What is the password for {s}?", "Which password belongs to {s}?")),
    ("year", "{s} was born in {v}.", ("In which year was {s} born?", "When was {s} born?")),
    ("room", "{s} is staying in room {v}.", ("Which room is {s} staying in?", "What is {s}'s room number?")),
)

TRAIN_SEEDS = range(0, 10**6)
PROBE_SEEDS = range(10**9, 10**9 + 10**6)


@dataclass(frozen=True)
class FactItem:
    id: str
    question: str
    branches: tuple[str, ...]
    answer: str
    answer_branch: int  # index of the branch holding the answer


def _subjects(kind: str, rng: random.Random, k: int) -> list[str]:
    pool = OBJECTS if kind == "color" else (CITIES if kind == "code" else NAMES)
    return rng.sample(pool, k)


def _values(kind: str, rng: random.Random, k: int) -> list[str]:
    if kind == "food":
        return rng.sample(FOODS, k)
    if kind == "city":
        return rng.sample(CITIES, k)
    if kind == "pet":
        return rng.sample(ANIMALS, k)
    if kind == "color":
        return rng.sample(COLORS, k)
    if kind == "code":
        return ["".join(rng.sample(CODE_PARTS, 2)).capitalize() + str(rng.randint(10, 99)) for _ in range(k)]
    if kind == "year":
        return [str(y) for y in rng.sample(range(1940, 2015), k)]
    return [str(r) for r in rng.sample(range(100, 999), k)]


def fact_item(seed: int) -> FactItem:
    """One item of facts spread over branches, fully determined by `seed`."""
    rng = random.Random(seed)
    n_branches = rng.randint(2, 4)
    per_branch = [rng.randint(1, 3) for _ in range(n_branches)]
    total = sum(per_branch)
    kinds = [rng.choice(RELATIONS) for _ in range(total)]
    # one relation kind shared by several facts makes the wrong-branch answers plausible
    main = rng.choice(RELATIONS)
    for i in rng.sample(range(total), min(total, max(2, n_branches))):
        kinds[i] = main
    facts, seen = [], {}
    for kind in kinds:
        seen.setdefault(kind[0], 0)
        seen[kind[0]] += 1
    pools = {k[0]: (iter(_subjects(k[0], rng, seen[k[0]])), iter(_values(k[0], rng, seen[k[0]]))) for k in kinds}
    for kind in kinds:
        subjects, values = pools[kind[0]]
        facts.append((kind, next(subjects), next(values)))
    rng.shuffle(facts)
    branches, at = [], 0
    for n in per_branch:
        branches.append(facts[at : at + n])
        at += n
    candidates = [(b, f) for b, fs in enumerate(branches) for f in fs if f[0] is main]
    answer_branch, (kind, subject, value) = rng.choice(candidates)
    texts = tuple(" ".join(k[1].format(s=s, v=v) for k, s, v in fs) for fs in branches)
    question = rng.choice(kind[2]).format(s=subject)
    return FactItem(f"facts-{seed}", question, texts, value, answer_branch)


def probe_items(n: int, offset: int = 0) -> list[FactItem]:
    """The held-out retrieval probe: `n` items from the probe seed range."""
    return [fact_item(PROBE_SEEDS[offset + i]) for i in range(n)]
