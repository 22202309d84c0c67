"""The `sql` tool: one read-only statement on a user's SQLite database file, bounded in time and rows.

Reading only holds three times over: the file is opened read-only (`mode=ro`: SQLite never writes it), the
connection is `PRAGMA query_only`, and an authorizer refuses every action but reading before a statement runs.
The authorizer is what stops ATTACH and VACUUM INTO, which would otherwise create new database files even on a
read-only connection. Pragmas are allowed in their reading form (`PRAGMA user_version`, `PRAGMA table_info(t)`);
the pragma table-valued functions (`pragma_table_info('t')`) are refused, since SQLite asks for them as writes.
The database file's bytes never change; a database in WAL mode still gets its `-wal` and `-shm` side files made
beside it by SQLite when they are missing, as for any reader.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Annotated

from .base import Tool, ToolError

_READS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_ACTIONS = {getattr(sqlite3, f"SQLITE_{name}"): name.replace("_", " ") for name in (
    "INSERT", "UPDATE", "DELETE", "CREATE_TABLE", "CREATE_INDEX", "CREATE_VIEW", "CREATE_TRIGGER", "CREATE_VTABLE",
    "CREATE_TEMP_TABLE", "CREATE_TEMP_INDEX", "CREATE_TEMP_VIEW", "CREATE_TEMP_TRIGGER", "DROP_TABLE", "DROP_INDEX",
    "DROP_VIEW", "DROP_TRIGGER", "DROP_VTABLE", "DROP_TEMP_TABLE", "DROP_TEMP_INDEX", "DROP_TEMP_VIEW",
    "DROP_TEMP_TRIGGER", "ALTER_TABLE", "ATTACH", "DETACH", "TRANSACTION", "SAVEPOINT", "ANALYZE", "REINDEX")}
_TABLE_WRITES = {sqlite3.SQLITE_INSERT: "INSERT into", sqlite3.SQLITE_UPDATE: "UPDATE",
                 sqlite3.SQLITE_DELETE: "DELETE from"}  # DROP and CREATE show up as writes to sqlite_master
# Pragmas that take an argument and only read; any other pragma given a value (`PRAGMA x = 1`) is refused.
_INFO_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
_MAX_VALUE_BYTES = 2**24  # SQLite's longest string or blob (so randomblob(1e9) cannot take a gigabyte)
_CELL_CHARS = 200         # one long value must not crowd the other rows out of the result
_COUNT_MOST = 100_000     # rows past the shown ones counted, at most
_CHECK_EVERY = 1000       # SQLite virtual-machine steps between looks at the clock


def sql_tool(path: str | Path, *, max_rows: int = 50, timeout_s: float = 5.0, max_chars: int = 8000,
             name: str = "sql", description: str | None = None) -> Tool:
    """A tool that runs one read-only SQLite statement (`query`) on the database file at `path` and returns
    its rows as a compact table: column names, at most `max_rows` rows (with how many more there were), values
    cut to 200 characters. A statement running past `timeout_s` is interrupted. The default description names
    the database's tables and columns.

    Raises ValueError naming the path when no file is there (none is made) or it is not a SQLite database."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"no SQLite database file at {path}")
    for option, value in (("max_rows", max_rows), ("timeout_s", timeout_s)):
        if not value > 0:
            raise ValueError(f"sql_tool {option} must be positive, got {value!r}")
    try:
        with closing(_connect(path)) as conn:
            tables = _tables(conn)
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path} is not a readable SQLite database: {exc}") from None

    def sql(query: Annotated[str, "one SQLite statement that reads, e.g. a SELECT"]) -> str:
        return _query(path, query, max_rows=max_rows, timeout_s=timeout_s)

    text = description or (f"Run one read-only SQLite statement on the database {path.name} and see at most "
                           f"{max_rows} rows. Tables: {tables}")
    return Tool.from_function(sql, name=name, description=text, timeout_s=timeout_s + 5.0, max_chars=max_chars)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only = ON")
    if hasattr(conn, "setlimit"):  # Python 3.11+
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _MAX_VALUE_BYTES)
    return conn


def _tables(conn: sqlite3.Connection, most: int = 2000) -> str:
    """`name(column type, ...)` of each table and view, cut to `most` characters."""
    names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                                        "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    parts = []
    for n in names:
        columns = conn.execute("SELECT name, type FROM pragma_table_info(?)", (n,)).fetchall()
        parts.append(f"{n}({', '.join(f'{c} {t}'.strip() for c, t in columns)})")
    text = "; ".join(parts) or "none"
    return text if len(text) <= most else text[:most] + " …"


def _query(path: Path, query: str, *, max_rows: int, timeout_s: float) -> str:
    if not query.strip():
        raise ToolError("the query is empty")
    refused: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        with closing(_connect(path)) as conn:
            conn.set_authorizer(lambda action, arg1, arg2, db, source: _authorize(refused, action, arg1, arg2))
            conn.set_progress_handler(lambda: time.monotonic() > deadline, _CHECK_EVERY)
            cursor = conn.execute(query)
            rows = cursor.fetchmany(max_rows)
            columns = [d[0] for d in cursor.description or ()]
            rest = _rest(cursor, deadline)
    except (sqlite3.Error, sqlite3.Warning) as exc:  # Warning: Python 3.10's "one statement at a time"
        raise ToolError(_explain(exc, refused, time.monotonic() > deadline, timeout_s)) from None
    if not columns:
        return "done (the statement returned no rows)"
    return _table(columns, rows, rest)


def _authorize(refused: list[str], action: int, arg1: str | None, arg2: str | None) -> int:
    if action in _READS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg2 is None or arg1 in _INFO_PRAGMAS):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        refused.append(f"set PRAGMA {arg1}")
    elif action in _TABLE_WRITES:
        refused.append(f"{_TABLE_WRITES[action]} {arg1}")
    else:
        refused.append(_ACTIONS.get(action, f"action {action}"))
    return sqlite3.SQLITE_DENY


def _rest(cursor: sqlite3.Cursor, deadline: float) -> str:
    """The note on the rows left after the shown ones ("" when none are)."""
    count = 0
    try:
        while count <= _COUNT_MOST and (chunk := cursor.fetchmany(1000)):
            count += len(chunk)
    except sqlite3.OperationalError:
        if time.monotonic() <= deadline:
            raise
        return "more rows not shown (counting them ran past the time limit)"
    if count > _COUNT_MOST:
        return f"over {_COUNT_MOST} more rows not shown"
    return f"{count} more row{'s' if count != 1 else ''} not shown" if count else ""


def _explain(exc: sqlite3.Error, refused: list[str], late: bool, timeout_s: float) -> str:
    if refused:
        return f"the sql tool only reads the database; this statement would {', '.join(dict.fromkeys(refused))}"
    if late and "interrupt" in str(exc):
        return f"the statement ran past its time limit of {timeout_s:g} s and was stopped"
    if "readonly" in str(exc):
        return f"the database is read-only ({exc})"
    return f"sqlite: {exc}"


def _table(columns: list[str], rows: list[tuple], rest: str) -> str:
    lines = [" | ".join(columns), *(" | ".join(_cell(v) for v in row) for row in rows)]
    lines.append(f"[{rest}]" if rest else f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"<blob of {len(value)} bytes>"
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= _CELL_CHARS else text[:_CELL_CHARS] + "…"
