"""Three SQL agents answer one question over a SQLite database; one synthesis reads their caches.

    python examples/sql_agents.py [--db shop.db]

Without --db a small shop database (customers, orders) is generated next to this script's output folder.
"""

import argparse
import random
import sqlite3
import tempfile
from pathlib import Path

import parsyn
from parsyn.agents import AGENT_INSTRUCTION, run_agents
from parsyn.tools import Toolbox, sql_tool


def make_shop(path: Path) -> None:
    rng = random.Random(0)
    con = sqlite3.connect(path)
    con.execute("create table customers (id integer primary key, name text, city text)")
    con.execute("create table orders (id integer primary key, customer_id integer, product text, qty integer)")
    con.executemany("insert into customers values (?, ?, ?)",
                    [(1, "Ada", "Lyon"), (2, "Bruno", "Porto"), (3, "Chiara", "Turin"), (4, "Dmitri", "Lyon")])
    con.executemany("insert into orders values (?, ?, ?, ?)",
                    [(k, rng.randrange(1, 5), rng.choice(["lamp", "desk", "rug"]), rng.randrange(1, 6))
                     for k in range(1, 41)])
    con.commit()
    con.close()


TOKENS = 160


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=TOKENS, help="each agent's token budget")
    args = parser.parse_args()
    db = args.db
    if db is None:
        db = Path(tempfile.mkdtemp()) / "shop.db"
        make_shop(db)
    lm = parsyn.load(args.model)
    question = ("Which city's customers ordered the most units? The tables are customers(id, name, city) and "
                "orders(id, customer_id, product, qty). Use the sql tool, then answer with the city.")
    run = run_agents(lm, question, Toolbox([sql_tool(db)]), workers=3, max_turns=2, handover="trajectory",
                     roles=["Join the two tables and sum qty per city.", "Count units per customer first.",
                            "Check your query's result before answering."],
                     sampling=parsyn.SamplingParams(max_new_tokens=args.tokens))
    for i, t in enumerate(run.trajectories, 1):
        print(f"agent {i}: {t.calls} calls, stopped by {t.stopped}: {t.answer}")
    truth = sqlite3.connect(db).execute("select c.city from orders o join customers c on c.id = o.customer_id "
                                        "group by c.city order by sum(o.qty) desc limit 1").fetchone()[0]
    for route in ("text", "cache"):
        s = parsyn.synthesize(lm, run.fork, route=route, instruction=AGENT_INSTRUCTION,
                              sampling=parsyn.SamplingParams(max_new_tokens=32))
        print(f"{route:5s} ({s.ttft_s * 1000:.0f} ms to first token): {s.answer}")
    print(f"the database says: {truth}")


if __name__ == "__main__":
    main()
