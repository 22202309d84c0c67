"""Atomic writes and resumable JSON lines: what a kill leaves behind is read back without loss or invention."""

from __future__ import annotations

import json
import os

import pytest

from parsyn.files import Records, read_records, write_json


def test_atomic_writes_keep_the_usual_file_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = write_json(tmp_path / "out" / "summary.json", {"a": 1})
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask) and json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temporary file left behind


def test_a_line_cut_by_a_kill_is_dropped_and_one_that_lost_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "x"')
    assert [r["id"] for r in read_records(path)] == ["a", "b"]
    with Records(path) as records:
        records.append({"id": "c"})
    assert [r["id"] for r in read_records(path)] == ["a", "b", "c"]
    path.write_text('{"id": "a"}\n{"id": "b"}')  # only the last newline is missing: the record is whole
    assert [r["id"] for r in read_records(path)] == ["a", "b"]
    with Records(path) as records:
        records.append({"id": "c"})
    assert path.read_text().splitlines() == ['{"id": "a"}', '{"id": "b"}', '{"id": "c"}']


def test_malformed_lines_are_named_never_skipped_silently(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"id": "a"}\nnot json\n[1, 2]\n{"id": "d"}\n')
    with pytest.raises(ValueError, match=r"2 malformed line\(s\): 2 .*; 3 \(not a JSON object\)"):
        read_records(path)
    assert [r["id"] for r in read_records(path, on_error="skip")] == ["a", "d"]
    assert read_records(tmp_path / "missing.jsonl") == []


def test_keep_rewrites_only_the_accepted_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with Records(path) as records:
        for step in range(1, 6):
            records.append({"step": step})
    Records(path).keep(lambda r: r["step"] <= 3)
    assert [r["step"] for r in read_records(path)] == [1, 2, 3]
