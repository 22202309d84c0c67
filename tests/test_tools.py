"""The tools layer with real parts: typed functions, a SQLite file, a document folder, the bubblewrap sandbox."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest

from parsyn.tools import (
    Tool,
    Toolbox,
    ToolError,
    calculator_tool,
    python_tool,
    search_tool,
    sql_tool,
    tool,
)
from parsyn.tools.calculator import evaluate
from parsyn.tools.sandbox import Limits

# ---------------------------------------------------------------- typed functions as tools


def book(city: Annotated[str, "where to stay"], nights: int, budget: float = 100.0, pets: bool = False,
         room: Literal["single", "double"] = "double", notes: Optional[str] = None,
         extras: list[str] = ()) -> str:
    """Book a hotel room.

    The second paragraph is for people, not for the model."""
    return json.dumps({"city": city, "nights": nights, "budget": budget, "pets": pets, "room": room,
                       "notes": notes, "extras": list(extras)})


def test_schema_is_derived_from_a_typed_signature():
    t = Tool.from_function(book)
    assert (t.name, t.description) == ("book", "Book a hotel room.")
    assert t.schema() == {"type": "function", "function": {"name": "book", "description": "Book a hotel room.",
                                                           "parameters": t.parameters}}
    assert t.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "where to stay"},
            "nights": {"type": "integer"},
            "budget": {"type": "number", "default": 100.0},
            "pets": {"type": "boolean", "default": False},
            "room": {"type": "string", "enum": ["single", "double"], "default": "double"},
            "notes": {"type": ["string", "null"], "default": None},
            "extras": {"type": "array", "items": {"type": "string"}, "default": []},
        },
        "required": ["city", "nights"],
        "additionalProperties": False,
    }
    json.dumps(t.parameters)  # what goes to the chat template is plain JSON


def test_valid_arguments_reach_the_function_as_typed():
    t = Tool.from_function(book)
    result = t.call('{"city": "Oslo", "nights": 2.0, "budget": 80, "extras": ["breakfast"], "notes": null}')
    assert result.ok and not result.truncated and result.elapsed_s >= 0
    got = json.loads(result.text)
    assert got == {"city": "Oslo", "nights": 2, "budget": 80.0, "pets": False, "room": "double", "notes": None,
                   "extras": ["breakfast"]}
    assert isinstance(got["nights"], int) and isinstance(got["budget"], float)


BAD_ARGUMENTS = {
    "unknown argument": ({"city": "Oslo", "nights": 1, "stars": 5}, "unknown argument 'stars'.*city, nights"),
    "missing argument": ({"city": "Oslo"}, "missing required argument 'nights'"),
    "string for an integer": ({"city": "Oslo", "nights": "two"}, "'nights' must be an integer, got 'two'"),
    "boolean for an integer": ({"city": "Oslo", "nights": True}, "'nights' must be an integer, got True"),
    "fraction for an integer": ({"city": "Oslo", "nights": 1.5}, "'nights' must be an integer, got 1.5"),
    "number for a string": ({"city": 7, "nights": 1}, "'city' must be a string, got 7"),
    "outside the enum": ({"city": "Oslo", "nights": 1, "room": "suite"}, "'room' must be one of 'single', "
                                                                           "'double', got 'suite'"),
    "wrong list item": ({"city": "Oslo", "nights": 1, "extras": ["a", 2]}, r"'extras\[1\]' must be a string"),
    "null where not optional": ({"city": None, "nights": 1}, "'city' must be a string, got None"),
    "invalid JSON": ('{"city": "Oslo",', "not valid JSON"),
    "JSON that is no object": ("[1, 2]", "must be a JSON object, got list"),
}


@pytest.mark.parametrize("arguments, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_end_in_a_clear_message_without_calling_the_tool(arguments, message):
    calls = []

    @tool
    def guarded(city: str, nights: int, room: Literal["single", "double"] = "double",
                extras: Optional[list[str]] = None) -> str:
        """Book."""
        calls.append(city)
        return "booked"

    result = guarded.call(arguments)
    assert not result.ok and result.text.startswith("error: bad arguments for guarded: "), result
    assert re.search(message, result.text), result.text
    assert calls == []


def test_signatures_json_schema_cannot_say_are_refused_when_the_tool_is_made():
    def untyped(x) -> str:
        """U."""

    def star(*names: str) -> str:
        """S."""

    def mixed(x: int | str) -> str:
        """M."""

    def mapping(x: dict) -> str:
        """D."""

    def bare(x: int) -> str:
        return ""

    with pytest.raises(TypeError, match="'x' has no type annotation"):
        Tool.from_function(untyped)
    with pytest.raises(TypeError, match="'names' is variadic positional"):
        Tool.from_function(star)
    for fn in (mixed, mapping):
        with pytest.raises(TypeError, match="parameter 'x'.*not supported"):
            Tool.from_function(fn)
    with pytest.raises(ValueError, match="'bare' needs a description"):
        Tool.from_function(bare)
    with pytest.raises(ValueError, match="name must be.*'<lambda>'"):
        Tool.from_function(lambda: "", description="no name")
    with pytest.raises(ValueError, match="timeout_s of 'bare' must be positive, got 0"):
        Tool.from_function(bare, description="d", timeout_s=0)
    assert Tool.from_function(bare, name="named", description="given").name == "named"


def test_a_tool_that_raises_ends_in_an_error_text():
    @tool
    def broken(x: int) -> str:
        """Fails."""
        if x == 1:
            raise ToolError("x must not be 1")
        if x == 2:
            raise SystemExit(3)
        return str(1 // (x - x))

    assert broken.call({"x": 0}).text == "error: ZeroDivisionError: integer division or modulo by zero"
    assert broken.call({"x": 1}).text == "error: x must not be 1"
    assert broken.call({"x": 2}).text == "error: SystemExit: 3"
    assert not any(broken.call({"x": x}).ok for x in (0, 1, 2))


def test_a_tool_that_hangs_is_abandoned_at_its_deadline():
    release = threading.Event()

    @tool(timeout_s=0.3)
    def stuck(seconds: float) -> str:
        """Waits."""
        release.wait(seconds)
        return "woke"

    try:
        start = time.monotonic()
        result = stuck.call({"seconds": 30})
        assert time.monotonic() - start < 2.0
        assert not result.ok and result.text == "error: stuck did not finish within 0.3 s and was abandoned"
        assert 0.3 <= result.elapsed_s < 2.0
        assert stuck.call({"seconds": 0}).text == "woke"
    finally:
        release.set()


def test_a_result_of_megabytes_is_cut_with_a_note():
    @tool(max_chars=1000)
    def flood(n: int) -> str:
        """Floods."""
        return "x" * n

    result = flood.call({"n": 5_000_000})
    assert result.ok and result.truncated
    assert result.text.startswith("x" * 1000) and not result.text.startswith("x" * 1001)
    assert result.text.endswith("[cut: 4999000 of 5000000 characters not shown]") and len(result.text) < 1100
    short = flood.call({"n": 1000})
    assert short.text == "x" * 1000 and not short.truncated


def test_results_that_are_not_text_become_json():
    @tool
    def stats(n: int) -> dict:
        """Numbers."""
        return {"n": n, "squares": [i * i for i in range(n)], "when": Path("/x")}

    assert json.loads(stats.call({"n": 3}).text) == {"n": 3, "squares": [0, 1, 4], "when": "/x"}


def test_a_toolbox_gives_schemas_and_answers_an_unknown_name_with_the_known_ones():
    box = Toolbox((Tool.from_function(book), calculator_tool()))
    assert [s["function"]["name"] for s in box.schemas()] == ["book", "calculator"]
    assert all(s["type"] == "function" for s in box.schemas())
    assert box.call("calculator", {"expression": "6 * 7"}).text == "42"
    unknown = box.call("weather", {"city": "Oslo"})
    assert not unknown.ok and unknown.text == "error: there is no tool 'weather' (the tools are: book, calculator)"
    bigger = box.with_tools(Tool.from_function(book, name="book2"))
    assert bigger.names == ("book", "calculator", "book2") and box.names == ("book", "calculator")
    with pytest.raises(ValueError, match="two tools named 'book'"):
        box.with_tools(Tool.from_function(book))
    with pytest.raises(TypeError, match="must hold Tool values, got function"):
        Toolbox([book])


# ---------------------------------------------------------------- sql


@pytest.fixture
def db(tmp_path) -> Path:
    path = tmp_path / "shop.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, picture BLOB)")
        conn.execute("CREATE INDEX by_name ON items (name)")
        conn.executemany("INSERT INTO items (name, price, picture) VALUES (?, ?, ?)",
                         [(f"item {i}", i / 2, b"\x00" * i if i % 2 else None) for i in range(120)])
    conn.close()
    return path


def test_sql_returns_rows_as_a_table_with_column_names(db):
    t = sql_tool(db)
    assert "items(id INTEGER, name TEXT, price REAL, picture BLOB)" in t.description
    result = t.call({"query": "SELECT id, name, price, picture FROM items WHERE id IN (1, 2) ORDER BY id"})
    assert result.ok, result
    assert result.text.splitlines() == ["id | name | price | picture", "1 | item 0 | 0.0 | NULL",
                                        "2 | item 1 | 0.5 | <blob of 1 bytes>", "(2 rows)"]
    assert t.call({"query": "PRAGMA table_info(items)"}).text.startswith("cid | name | type")


def test_sql_caps_the_rows_it_shows(db):
    t = sql_tool(db, max_rows=50)
    text = t.call({"query": "SELECT id FROM items ORDER BY id LIMIT 120"}).text
    lines = text.splitlines()
    assert lines[0] == "id" and lines[1:51] == [str(i) for i in range(1, 51)]
    assert lines[51:] == ["[70 more rows not shown]"]
    endless = t.call({"query": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"})
    assert endless.ok and endless.text.endswith("[over 100000 more rows not shown]")


WRITES = {
    "insert": "INSERT INTO items (name) VALUES ('new')",
    "update": "UPDATE items SET price = 0",
    "delete": "DELETE FROM items",
    "drop": "DROP TABLE items",
    "create": "CREATE TABLE other (x)",
    "alter": "ALTER TABLE items ADD COLUMN colour TEXT",
    "reindex": "REINDEX by_name",
    "attach": "ATTACH DATABASE '{dir}/attached.db' AS other",
    "vacuum": "VACUUM",
    "vacuum into": "VACUUM INTO '{dir}/copy.db'",
    "pragma write": "PRAGMA user_version = 7",
    "pragma query_only off": "PRAGMA query_only = 0",
    "journal mode": "PRAGMA journal_mode = WAL",
    "transaction": "BEGIN IMMEDIATE",
    "second statement": "SELECT 1; DROP TABLE items",
}


@pytest.mark.parametrize("statement", WRITES.values(), ids=WRITES.keys())
def test_sql_refuses_writes_and_leaves_the_file_as_it_was(db, statement):
    before, listing = db.read_bytes(), sorted(db.parent.iterdir())
    result = sql_tool(db).call({"query": statement.format(dir=db.parent)})
    assert not result.ok, result
    assert result.text.startswith(("error: the sql tool only reads", "error: sqlite: You can only execute one"))
    assert db.read_bytes() == before and sorted(db.parent.iterdir()) == listing
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*), sum(price) FROM items").fetchone() == (120, 3570.0)
    conn.close()


def test_a_long_sql_statement_is_interrupted_at_its_time_limit(db):
    t = sql_tool(db, timeout_s=0.3)
    start = time.monotonic()
    result = t.call({"query": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"})
    assert time.monotonic() - start < 3.0
    assert not result.ok and result.text == "error: the statement ran past its time limit of 0.3 s and was stopped"
    assert t.call({"query": "SELECT count(*) FROM items"}).text == "count(*)\n120\n(1 row)"


def test_a_missing_or_foreign_database_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere.db"
    with pytest.raises(ValueError, match=f"no SQLite database file at {re.escape(str(missing.resolve()))}$"):
        sql_tool(missing)
    assert not missing.exists()
    with pytest.raises(ValueError, match="no SQLite database file at"):
        sql_tool(tmp_path)
    text = tmp_path / "notes.db"
    text.write_text("these are notes, not a database " * 100)
    with pytest.raises(ValueError, match="notes.db is not a readable SQLite database"):
        sql_tool(text)


def test_sql_errors_of_the_statement_are_text(db):
    t = sql_tool(db)
    assert t.call({"query": "SELECT * FROM stock"}).text == "error: sqlite: no such table: stock"
    assert t.call({"query": "   "}).text == "error: the query is empty"
    assert t.call({"query": "SELECT randomblob(100000000)"}).text == "error: sqlite: string or blob too big"
    db.unlink()  # gone after the tool was made
    assert t.call({"query": "SELECT 1"}).text.startswith("error: sqlite: unable to open database file")


# ---------------------------------------------------------------- search


@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    (folder / "guides").mkdir(parents=True)
    (folder / "guides" / "kiln.md").write_text(
        "# Firing a kiln\n\nLoad the kiln loosely.\n\nStoneware glaze matures at cone six, about 1220 degrees.")
    (folder / "bread.txt").write_text("Bread dough rises when yeast ferments sugar; bake at 220 degrees.")
    (folder / "garden.txt").write_text("Tomatoes need six hours of sun and deep watering.")
    (folder / "tea.md").write_text("Green tea steeps at 80 degrees for two minutes.")
    (folder / "ignored.csv").write_text("glaze,cone,stoneware")
    return folder


def test_bm25_finds_the_right_document_among_distractors(docs):
    t = search_tool(docs, k=2)
    result = t.call({"query": "what cone does stoneware glaze mature at"})
    assert result.ok and result.text.startswith("[1] guides/kiln.md (score "), result.text
    assert "cone six" in result.text and "ignored.csv" not in result.text
    assert t.call({"query": "yeast bread", "k": 1}).text.startswith("[1] bread.txt")
    assert t.call({"query": "zeppelin"}).text == "no passage matches 'zeppelin'"
    assert t.call({"query": "the of and"}).text == "error: the query 'the of and' has no words to search for"
    assert t.call({"query": "tea", "k": 11}).text == "error: k must be between 1 and 10, got 11"
    assert t.parameters["properties"]["k"] == {"type": "integer", "description": "how many passages to return, 1 "
                                                                                "to 10", "default": 2}


def test_long_documents_are_searched_as_passages(tmp_path):
    filler = " ".join(f"filler{i}" for i in range(300))
    corpus = tmp_path / "docs.jsonl"
    rows = [{"id": "manual", "title": "Pump manual", "text": f"{filler}\n\nThe pump's seal is replaced yearly.\n\n"
                                                              f"{filler}"},
            {"id": 7, "text": "A seal is a marine mammal."}]
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    t = search_tool(corpus, passage_chars=500)
    text = t.call({"query": "pump seal replaced", "k": 1}).text
    first, passage = text.split("\n", 1)
    assert first.startswith("[1] manual#") and "— Pump manual" in first
    assert "The pump's seal is replaced yearly." in passage and len(passage) <= 500


def test_a_missing_empty_or_malformed_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no folder or .jsonl file at .*nowhere"):
        search_tool(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text to search in .*empty"):
        search_tool(tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected an object"):
        search_tool(bad)
    bad.write_text('{"id": "a", "text": "one"}\n{"id": "a", "text": "two"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: the id 'a' is used twice"):
        search_tool(bad)
    bad.write_text('{"id": "a", "text": "one"\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not JSON"):
        search_tool(bad)


# ---------------------------------------------------------------- calculator

SUMS = {"1 + 2 * 3": 7, "(1 + 2) * 3": 9, "7 // 2": 3, "-7 % 3": 2, "2 ** 10": 1024, "-2 ** 2": -4,
        "10 / 4": 2.5, "sqrt(16) + abs(-1)": 5.0, "round(2.675, 2)": 2.67, "max(1, 5, 3) - min(4, 2)": 3,
        "log(8, 2)": 3.0, "cos(pi)": -1.0, "2 ** 0.5 * 2 ** 0.5": 2.0000000000000004, "e": 2.718281828459045,
        "2 ** 100": 2**100}


@pytest.mark.parametrize("expression, value", SUMS.items(), ids=SUMS.keys())
def test_the_calculator_computes_arithmetic(expression, value):
    assert evaluate(expression) == value and type(evaluate(expression)) is type(value)


REFUSED = {
    "__import__('os')": "refused: a call of '__import__'",
    "().__class__": "refused: Attribute",
    "x + 1": "refused: the name 'x'",
    "'a' * 3": "refused: the constant 'a'",
    "True + 1": "refused: the constant True",
    "[1, 2]": "refused: List",
    "9 ** 9 ** 9": r"9 \*\* 387420489 is too large",
    "2 ** 20000": "too large",
    "10.0 ** 400": "the result is too large",
    "1e308 * 10": "not a finite number",
    "1 / 0": "division by zero",
    "sqrt(-1)": "math domain error",
    "(-8) ** 0.5": "complex",
    "round(10, -10 ** 9)": "round\\(\\) takes at most 400 digits",
    "sqrt(x=4)": "plain arguments only",
    "1 +": "not an arithmetic expression",
    "1" * 2000: "at most 1000",
}


@pytest.mark.parametrize("expression, message", REFUSED.items(), ids=[k[:20] for k in REFUSED])
def test_the_calculator_refuses_all_but_arithmetic_quickly(expression, message):
    start = time.monotonic()
    result = calculator_tool().call({"expression": expression})
    assert time.monotonic() - start < 1.0
    assert not result.ok and result.text.startswith("error: "), result
    assert re.search(message, result.text), result.text


def test_the_calculator_tool_prints_exact_values():
    t = calculator_tool()
    assert [t.call({"expression": e}).text for e in ("2 ** 64", "0.1 + 0.2", "6 / 3")] == \
        ["18446744073709551616", "0.30000000000000004", "2.0"]


# ---------------------------------------------------------------- python (the real sandbox)

FAST = Limits(timeout_s=5.0)


def test_the_python_tool_returns_what_the_program_prints():
    t = python_tool(limits=FAST)
    assert t.name == "python" and t.parameters["required"] == ["code"]
    result = t.call({"code": "import math\nprint(math.factorial(20))"})
    assert (result.ok, result.text) == (True, "2432902008176640000\n")
    assert t.call({"code": "x = 1"}).text == "(no output)"


def test_python_tool_output_keeps_the_order_written():
    code = "import sys\nprint('one')\nprint('two', file=sys.stderr)\nprint('three')\nraise KeyError('four')"
    result = python_tool(limits=FAST).call({"code": code})
    assert not result.ok
    head, output = result.text.split("\n", 1)
    assert head == "error: the program raised an exception or exited early"
    assert output.startswith("one\ntwo\nthree\nTraceback") and output.endswith("KeyError: 'four'\n"), output


def test_the_python_tool_reports_timeouts_and_syntax_errors():
    t = python_tool(limits=Limits(timeout_s=1.0))
    slow = t.call({"code": "while True:\n    pass"})
    assert not slow.ok and slow.text.startswith("error: the program ran past its time limit of 1 s")
    assert slow.elapsed_s < 6.0
    broken = t.call({"code": "def f(:\n    pass"})
    assert not broken.ok and "did not compile" in broken.text and "SyntaxError" in broken.text
