#!/usr/bin/env python3
"""Per-stage timings of Detect, Segment and Analyze(detection + segmentation) on one image,
read from the timings every polyhead response carries, measured side by side in one run.

Usage: scripts/stage_timings.py [--server ADDR] [--image PATH] [--repeats N]
(needs a running server, e.g. `make run`, and the `polyhead` CLI built by `make build`).
"""

import argparse
import json
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["decode_ms", "preprocess_ms", "backbone_ms", "postprocess_ms", "total_ms"]


def timings(cli, server, args):
    out = subprocess.run(
        [cli, "--server", server, "--json", *args], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)["timings"]


def measure(cli, server, args, repeats):
    for _ in range(3):
        timings(cli, server, args)
    runs = [timings(cli, server, args) for _ in range(repeats)]
    row = {stage: statistics.median(r[stage] for r in runs) for stage in STAGES}
    row["backbone_passes"] = runs[0]["backbone_passes"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--image", default=str(ROOT / ".cache/testdata/astronaut.png"))
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--cli", default=str(ROOT / "target/release/polyhead"))
    a = parser.parse_args()
    calls = {
        "Detect": ["detect", a.image],
        "Segment": ["segment", a.image],
        "Analyze(det+seg)": ["analyze", a.image, "--head", "detection", "--head", "segmentation"],
    }
    rows = {name: measure(a.cli, a.server, args, a.repeats) for name, args in calls.items()}
    print(f"{'call':<18}" + "".join(f"{s:>15}" for s in STAGES) + f"{'passes':>8}")
    for name, row in rows.items():
        cells = "".join(f"{row[s]:>15.2f}" for s in STAGES)
        print(f"{name:<18}{cells}{row['backbone_passes']:>8}")
    separate = rows["Detect"]["total_ms"] + rows["Segment"]["total_ms"]
    print(f"Analyze / (Detect + Segment), median total: {rows['Analyze(det+seg)']['total_ms'] / separate:.2f}")


if __name__ == "__main__":
    main()
