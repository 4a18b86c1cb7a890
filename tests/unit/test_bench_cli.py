"""`python -m bench` runs and reports: the codec benchmarks in quick mode, as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_quick_codec_json(tmp_path):
    out = tmp_path / "latest.json"
    p = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "codec", "--json", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(p.stdout)
    assert doc == json.loads(out.read_text())  # the file holds what was printed
    assert doc["quick"] is True and doc["machine"]["cores"] >= 1
    rows = {r["benchmark"]: r for r in doc["results"]}
    for name in ("codec.fastavro_reader", "codec.decode_rows", "synth.generate", "codec.peak_rss_stream"):
        assert name in rows, sorted(rows)
        r = rows[name]
        assert isinstance(r["value"], (int, float)) and r["value"] > 0, r
        assert r["unit"] and "note" in r and "ok" in r
    assert rows["codec.decode_rows"]["target"] == ">= 300"
