"""A short run of `scripts/cache_memory.py` on the tiny set with a 4 MiB cache: the cache fills to
its budget and then evicts one entry per new image, the figures it prints are the server's, and
the features it holds stay outside ONNX Runtime's arena."""

import json
import subprocess
import sys

from conftest import MODELS, ROOT, SERVER_BIN

SCRIPT = ROOT / "scripts" / "cache_memory.py"


def test_cache_memory_fills_the_cache_and_reports_each_step(tmp_path):
    assert SERVER_BIN.exists(), f"{SERVER_BIN} is missing: run `make test`"
    report_path = tmp_path / "cache_memory.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", str(MODELS), "--cache-mib", "4",
         "--churn", "5", "--side", "128", "--json", str(report_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["warmed up", "3 images", "cache full", "+5 images"]

    full, churned = steps["cache full"], steps["+5 images"]
    assert full["cache_mib"] >= 0.95 * 4 or full["evicted"] > 0, full
    assert churned["cache_mib"] <= 4, "never beyond the budget"
    assert churned["evicted"] >= full["evicted"] + 5, "every new image evicts"
    for step in steps.values():
        assert step["VmHWM"] >= step["VmRSS"] > 0, step
        assert step["RssAnon"] > 0 and step["RssFile"] > 0, step
        # Between runs the arena's tensors are the weights: the cached features (about 4 MiB)
        # live elsewhere.
        weights = steps["warmed up"]["arena_in_use_mib"]
        assert weights > 0
        assert abs(step["arena_in_use_mib"] - weights) < 1, step
        assert step["arena_mib"] >= step["arena_in_use_mib"], step
    assert report["segment_p50_ms"] > 0
