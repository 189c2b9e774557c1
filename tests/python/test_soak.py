"""A short run of the soak command (`scripts/soak.py`, `make soak`) against the real server binary:
every kind of call is made, including hostile inputs, tiny deadlines and client cancellations,
and none gets a status it may not return. The RSS growth target is for the full soak; here the
RSS figures only have to be there."""

import json
import subprocess
import sys

from conftest import MODELS, ROOT, SERVER_BIN

SOAK = ROOT / "scripts" / "soak.py"


def test_short_soak_has_no_unexpected_status(tmp_path):
    assert SERVER_BIN.exists(), f"{SERVER_BIN} is missing: run `make test`"
    report_path = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(SOAK), "--seconds", "20", "--concurrency", "4",
         "--warmup-seconds", "5", "--max-growth-mb", "1000000", "--models", str(MODELS),
         "--json", str(report_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())

    assert report["unexpected_total"] == 0, report["unexpected"]
    assert report["unexpected"] == []
    assert report["passed"] and report["failures"] == []
    assert report["server_exit_code"] == 0

    kinds = {
        "detect", "segment", "analyze", "extract_then_detect", "action_video", "action_frames",
        "list_models", "hostile_truncated_jpeg", "hostile_random_bytes", "unknown_handle",
        "tiny_deadline", "client_cancel",
    }
    assert set(report["calls"]) == kinds
    for kind, row in report["calls"].items():
        assert row["calls"] >= 1, f"{kind} was never called"
        assert sum(row["statuses"].values()) == row["calls"]
    # Hostile inputs were refused as such, not answered.
    assert set(report["calls"]["hostile_truncated_jpeg"]["statuses"]) <= {
        "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
    assert set(report["calls"]["hostile_random_bytes"]["statuses"]) <= {
        "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}

    rss = report["rss"]
    for field in ("start_mb", "warmup_end_mb", "max_after_warmup_mb", "final_mb"):
        assert rss[field] > 0, (field, rss)
    assert rss["growth_mb"] == rss["max_after_warmup_mb"] - rss["warmup_end_mb"]
    assert rss["samples"] >= 10
