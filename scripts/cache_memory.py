#!/usr/bin/env python3
"""What a full feature cache costs the server: fills it with new images, keeps evicting, and
prints the server's memory at each step.

Usage: scripts/cache_memory.py [--models models/generated/swin-t] [--cache-mib 256]
                               [--churn 150] [--json PATH] [-- SERVER FLAGS...]

Starts `target/release/polyhead-server` on a free loopback port with the given feature cache
budget, then Segments 512x512 images of random pixels (each one new, so each runs the backbone
and adds an entry) until the cache holds 95% of its budget or starts evicting, then `--churn`
more, one at a time. After warm-up, after three images, with the cache full and after the churn
it prints the server's VmHWM (peak), VmRSS, RssAnon and RssFile in MiB, the bytes of ONNX
Runtime's shared CPU arena (`polyhead_runtime_arena_bytes`, in use) and the cache's bytes and
evictions; the Segment p50 while filling. `--json PATH` also writes those figures. Flags after
`--` go to the server.
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from soak import free_port, load_stubs

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def memory(pid: int) -> dict:
    wanted = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[key] = int(value.split()[0]) // 1024
    return out


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if not line.startswith("#") and re.match(re.escape(name) + r"[ {]", line))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(ROOT / "models" / "generated" / "swin-t"))
    parser.add_argument("--cache-mib", type=int, default=256)
    parser.add_argument("--churn", type=int, default=150)
    parser.add_argument("--intra-threads", type=int, default=2)
    parser.add_argument("--side", type=int, default=512, help="width and height of each image")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("server_args", nargs="*")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="polyhead-cache-memory-"))
    pb, pb_grpc = load_stubs(work / "stubs")
    grpc_port, metrics_port = free_port(), free_port()
    log = open(work / "server.log", "w")
    server = subprocess.Popen(
        [str(ROOT / "target" / "release" / "polyhead-server"), "--models", args.models,
         "--listen", f"127.0.0.1:{grpc_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
         "--intra-threads", str(args.intra_threads), "--cache-bytes", str(args.cache_mib * MIB),
         *args.server_args],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "ORT_DISABLE_TELEMETRY": os.environ.get("ORT_DISABLE_TELEMETRY", "1")},
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}",
                                        options=[("grpc.max_send_message_length", 64 * MIB)])
        stub = pb_grpc.PolyheadStub(channel)
        deadline = time.monotonic() + 300
        while True:
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=2)
                break
            except grpc.RpcError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print(f"the server did not start; log: {work / 'server.log'}", file=sys.stderr)
                    return 1
                time.sleep(0.5)

        steps = []

        def report(step: str) -> None:
            figures = {
                "step": step,
                **memory(server.pid),
                "arena_mib": metric(metrics_port, "polyhead_runtime_arena_bytes") / MIB,
                "arena_in_use_mib": metric(metrics_port,
                                           "polyhead_runtime_arena_in_use_bytes") / MIB,
                "cache_mib": metric(metrics_port, "polyhead_feature_cache_bytes") / MIB,
                "evicted": metric(metrics_port, "polyhead_feature_cache_evictions_total"),
            }
            steps.append(figures)
            mem = " ".join(f"{k} {figures[k]}" for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"))
            print(f"{step:<14} {mem} | arena {figures['arena_mib']:.1f} "
                  f"(in use {figures['arena_in_use_mib']:.1f}) | "
                  f"cache {figures['cache_mib']:.1f} MiB, {figures['evicted']:.0f} evicted",
                  flush=True)

        rng = random.Random(1)
        side = args.side

        def segment() -> float:
            image = pb.Image(raw=pb.RawImage(width=side, height=side,
                                             rgb=rng.randbytes(side * side * 3)))
            started = time.perf_counter()
            stub.Segment(pb.SegmentRequest(image=image), timeout=120)
            return time.perf_counter() - started

        report("warmed up")
        latencies = [segment() for _ in range(3)]
        report("3 images")
        budget = args.cache_mib * MIB
        while (metric(metrics_port, "polyhead_feature_cache_bytes") < 0.95 * budget
               and metric(metrics_port, "polyhead_feature_cache_evictions_total") == 0):
            latencies.append(segment())
        report("cache full")
        for _ in range(args.churn):
            segment()
        report(f"+{args.churn} images")
        p50_ms = 1000 * statistics.median(latencies)
        print(f"Segment p50 while filling: {p50_ms:.1f} ms ({len(latencies)} calls)")
        if args.json:
            args.json.write_text(json.dumps(
                {"cache_budget_mib": args.cache_mib, "steps": steps,
                 "segment_p50_ms": p50_ms, "segments": len(latencies) + args.churn}, indent=2))
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
