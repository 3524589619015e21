"""A run cut short keeps its rows: the partial JSON-lines file loads and merges like a results file."""

from __future__ import annotations

import json

from benchmarks.conftest import Session
from benchmarks.harness import Row
from benchmarks.report import load, partial_path, run_facts, write_results


def test_partial_rows_load_and_merge(tmp_path):
    facts = run_facts("cpu", "quick")
    path = partial_path(facts, "120000", directory=tmp_path)
    session = Session("quick", "cpu", partial=path)
    session._append({"facts": facts})
    measured = [Row("supcon8", "torch", 1024, 128, "float32", "cpu", "fwd", median_s=0.25, peak_bytes=2**20),
                Row("supcon8", "reference", 1024, 128, "float32", "cpu", "fwd", status="oom"),
                Row("supcon8", "triton", 1024, 128, "float32", "cpu", "fwd", status="n/a", reason="no GPU")]
    for row in measured:
        session.save_row(row)
    assert path.name.endswith("-partial-120000.jsonl") and len(path.read_text().splitlines()) == 4

    loaded_facts, rows, rates = load(path)
    assert loaded_facts == facts and rates is None
    assert [r.to_json() for r in rows] == [r.to_json() for r in measured]

    stem = write_results(loaded_facts, rows, rates, directory=tmp_path)
    payload = json.loads(stem.with_suffix(".json").read_text())
    assert [r["status"] for r in payload["rows"]] == ["ok", "oom", "n/a"]
    assert "0.25" not in stem.with_suffix(".md").read_text()  # 250 ms is shown in ms
    assert "250 ms" in stem.with_suffix(".md").read_text()
