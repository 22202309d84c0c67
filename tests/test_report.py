"""The HTML report: self-contained, escaped, with valid PNGs; clear errors for missing or malformed inputs."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from parsyn.eval.report import plots, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENV = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "device": "cpu", "torch": "2.13.0+cpu",
       "transformers": "5.24.0", "threads": 2, "cpu_count": 2, "machine": "x86_64", "processor": "AMD EPYC",
       "python": "3.11.7"}
TASKS = ("gsm8k", "mmlu", "humaneval")
METHODS = ("single", "text", "cache-parallel", "cache-trained", "ape", "x<b>bold</b>", r"odd$\notacommand$")
EVAL_COMMAND = "parsyn eval --tasks gsm8k,mmlu,humaneval --methods text,cache-parallel --limit 50 --out results/eval"
BENCH_COMMAND = "parsyn bench --branches 1,2,4,8 --lengths 128,256,512,1024 --repeats 3"


def summary() -> dict:
    rows = []
    for i, task in enumerate(TASKS):
        for j, method in enumerate(METHODS):
            rows.append({"task": task, "method": method, "n": 50, "accuracy": 0.02 * (i + j),
                         "agreement": None if method == "single" else 1.0 - 0.1 * j,
                         "ttft_median_s": 1.9 / (j + 1), "ttft_p90_s": 2.6 / (j + 1),
                         "prefill_tokens_mean": 640.2 / (j + 1), "latency_median_s": 6.1 - 0.3 * j})
    del rows[-1]["latency_median_s"]  # optional keys may be missing
    return {"command": EVAL_COMMAND, "created": "2026-11-28T20:00:00Z", "environment": ENV,
            "config": {"workers": 3, "limit": 50, "seed": 0, "max_new_tokens": 128}, "rows": rows}


def bench() -> dict:
    cells = []
    for b in (1, 2, 4, 8):
        for n in (128, 256, 512, 1024):
            text, floor = 0.004 * b * n, 0.2 + 0.00001 * b * n
            cache = floor * 0.97
            cells.append({"branches": b, "length": n, "branch_tokens": [n + 6] * b, "prefix_tokens": 34,
                          "prompt_tokens": 40, "layout": "parallel", "text_ttft_s": text, "cache_ttft_s": cache,
                          "floor_s": floor,
                          "speedup": text / cache, "overhead": (cache - floor) / floor})
    cells[-1]["speedup"] = 21.6  # a known value to find in the table
    return {"command": BENCH_COMMAND, "environment": ENV, "cells": cells}


def write(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def assert_png(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000
    width, height = Image.open(io.BytesIO(data)).size
    assert width >= 300 and height >= 200


def test_report_with_bench_is_self_contained_and_escaped(tmp_path):
    write(tmp_path / "eval" / "summary.json", summary())
    write(tmp_path / "bench.json", bench())
    out = write_report(tmp_path / "eval", bench=tmp_path / "bench.json")
    assert out == tmp_path / "eval" / "report.html" and out.exists()
    page = out.read_text(encoding="utf-8")
    assert EVAL_COMMAND in page and BENCH_COMMAND in page and "2026-11-28T20:00:00Z" in page
    for name in TASKS + ("SmolLM2-135M-Instruct", "2.13.0+cpu", "5.24.0", "AMD EPYC"):
        assert name in page
    for method in METHODS:
        assert f"<td>{method.replace('<', '&lt;').replace('>', '&gt;')}</td>" in page
    assert "x&lt;b&gt;bold&lt;/b&gt;" in page and "<b>" not in page
    assert "21.6×" in page and "-3.0%" in page and "<td>parallel</td>" in page  # bench table
    assert 'src="http' not in page and "href=" not in page and "<script" not in page and "<link" not in page
    images = embedded_pngs(page)
    assert len(images) == 4
    for image in images:
        assert_png(image)
    names = {"accuracy.png", "agreement.png", "ttft.png", "speedup.png"}
    assert {p.name for p in out.parent.glob("*.png")} == names
    for name in names:
        assert_png((out.parent / name).read_bytes())


def test_two_bench_files_give_two_sets_of_bench_plots_and_tables(tmp_path):
    write(tmp_path / "summary.json", summary())
    gpu = dict(bench(), environment=dict(ENV, model="random qwen3-14b", device="cuda:0"),
               command="parsyn bench --device cuda")
    gpu["cells"] = [dict(c, speedup=c["speedup"] / 2) for c in gpu["cells"]]
    gpu["cells"][-1]["speedup"] = 10.4
    write(tmp_path / "cpu.json", bench())
    write(tmp_path / "gpu.json", gpu)
    out = write_report(tmp_path, bench=[tmp_path / "cpu.json", tmp_path / "gpu.json"])
    page = out.read_text(encoding="utf-8")
    assert "21.6×" in page and "10.4×" in page and "parsyn bench --device cuda" in page and BENCH_COMMAND in page
    assert "Time to first token by route — random qwen3-14b" in page and "<th>bench 2</th>" in page
    assert {p.name for p in tmp_path.glob("*.png")} == {"accuracy.png", "agreement.png", "ttft.png", "speedup.png",
                                                          "ttft-2.png", "speedup-2.png"}
    assert len(embedded_pngs(page)) == 6


def test_without_bench_there_are_no_bench_plots_or_table(tmp_path):
    write(tmp_path / "summary.json", summary())
    out = write_report(tmp_path, out=tmp_path / "html" / "r.html")
    page = out.read_text(encoding="utf-8")
    assert len(embedded_pngs(page)) == 2
    assert {p.name for p in (tmp_path / "html").glob("*.png")} == {"accuracy.png", "agreement.png"}
    assert "speed-up" not in page and "cache TTFT" not in page and BENCH_COMMAND not in page


def test_plots_returns_written_paths_and_skips_all_null_agreement(tmp_path):
    data = summary()
    rows = [dict(r, agreement=None) for r in data["rows"]]
    before = json.dumps(data)
    paths = plots(dict(data, rows=rows), bench(), tmp_path / "png")
    assert [p.name for p in paths] == ["accuracy.png", "ttft.png", "speedup.png"]
    assert all(p.exists() for p in paths)
    assert json.dumps(data) == before


def test_missing_summary_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "summary.json"))):
        write_report(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"rows": {"task": "gsm8k"}}', '{"rows": [{"task": "x"}]}'])
def test_malformed_summary_names_the_file(tmp_path, text):
    (tmp_path / "summary.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "summary.json"))):
        write_report(tmp_path)


def test_missing_or_malformed_bench_names_the_file(tmp_path):
    write(tmp_path / "summary.json", summary())
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nope.json"))):
        write_report(tmp_path, bench=tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"cells": [{"branches": 2}]}')
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "bad.json"))):
        write_report(tmp_path, bench=tmp_path / "bad.json")


def test_heat_map_orders_lengths_and_branches_numerically():
    from parsyn.eval import report

    cells = [c for c in bench()["cells"] if c["branches"] in (2, 8)] + [dict(bench()["cells"][0], branches=16)]
    ax = report._speedup_map(cells).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["128", "256", "512", "1024"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["2", "8", "16"]
    assert "21.6×" in [t.get_text() for t in ax.texts]


def test_the_report_leads_with_accuracy_intervals_and_paired_differences(tmp_path):
    from parsyn.eval import stats as S

    text = {"gsm8k": [True] * 20 + [False] * 20, "mmlu": [True, False] * 10}
    other = {"gsm8k": [True] * 20 + [False] * 20, "mmlu": [False, False] * 10}
    rows = []
    for task in text:
        for method, scores in (("text", text[task]), ("cache-trained", other[task])):
            row = {"task": task, "method": method, **S.accuracy(scores), "agreement": None, "ttft_median_s": 0.1}
            if method != "text":
                row["vs_text"] = S.paired(scores, text[task])
            rows.append(row)
    write(tmp_path / "summary.json", {**summary(), "rows": rows})
    page = write_report(tmp_path).read_text()
    assert "Smoke test" in page and "mmlu" in page.split("Smoke test")[1].split("</p>")[0]  # 20 items < 30
    assert "gsm8k" not in page.split("Smoke test")[1].split("</p>")[0]  # 40 items is not a smoke test
    assert "cache-trained: 1 of 2</li>" in page  # gsm8k at parity (the same answers), mmlu far below
    assert "+0.0 [+0.0, +0.0]" in page and "-50.0 [" in page and (tmp_path / "vs-text.png").is_file()
    assert "At chance" not in page  # a summary without chance levels warns of nothing
    # text at 50% on 20 two-way items reaches down to a coin's 50%; at 50% of 40 written answers it is above 0
    write(tmp_path / "summary.json", {**summary(), "rows": rows, "chance": {"gsm8k": 0.0, "mmlu": 0.5, "all": 0.25}})
    page = write_report(tmp_path).read_text()
    warning = page.split("At chance")[1].split("</p>")[0]
    assert "mmlu (50%)" in warning and "gsm8k" not in warning
    assert "cache-trained: 1 of 2 (1 of 1 where text is above chance)" in page
