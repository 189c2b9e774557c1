#!/usr/bin/env python3
"""What a Detect costs in the server outside its stages, for one or more server binaries side by
side: each binary runs as its own server, and the calls alternate between them, one each in turn.

For every server it prints the medians of the client's latency, the server's `total_ms`, the
server's total minus the stages it reports (decode, preprocess, backbone, head runs,
post-processing: what is left is thread hand-offs and queueing), and the client's latency minus
the server's total (transport and this client). Compare two builds of the server with
`--server-bin old/polyhead-server --server-bin target/release/polyhead-server`.

Usage: scripts/server_overhead.py [--server-bin PATH ...] [--models DIR] [--image PATH] [--calls N]
(the venv that `make setup` installs has grpcio and grpcio-tools).
"""

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import grpc

from soak import ROOT, free_port, load_stubs


def start(binary, models, log):
    port, metrics = free_port(), free_port()
    process = subprocess.Popen(
        [binary, "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics}",
         "--models", str(models), "--intra-threads", "2", "--cache-bytes", "0"],
        env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"},
        cwd=ROOT, stdout=log, stderr=log,
    )
    return process, f"127.0.0.1:{port}"


def wait_ready(stub, pb, process):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"a server exited with {process.returncode}")
        try:
            stub.ListModels(pb.ListModelsRequest(), timeout=1)
            return
        except grpc.RpcError:
            time.sleep(0.5)
    raise SystemExit("a server was not ready after 120 s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-bin", action="append", default=[],
                        help="a polyhead-server binary (repeat to compare several)")
    parser.add_argument("--models", default=str(ROOT / "models/generated/tiny"))
    parser.add_argument("--image", default=str(ROOT / ".cache/testdata/astronaut.png"))
    parser.add_argument("--calls", type=int, default=300, help="measured calls per server")
    a = parser.parse_args()
    binaries = a.server_bin or [str(ROOT / "target/release/polyhead-server")]
    work = Path(tempfile.mkdtemp(prefix="polyhead-overhead-"))
    pb, pbg = load_stubs(work / "stubs")
    image = pb.Image(encoded=Path(a.image).read_bytes())
    options = [("grpc.max_send_message_length", 64 << 20)]
    servers = []
    try:
        for i, binary in enumerate(binaries):
            process, addr = start(binary, a.models, open(work / f"server-{i}.log", "w"))
            stub = pbg.PolyheadStub(grpc.insecure_channel(addr, options=options))
            servers.append((binary, process, stub))
        for _, process, stub in servers:
            wait_ready(stub, pb, process)
        samples = {binary: [] for binary in binaries}
        for turn in range(a.calls + 5):
            for binary, _, stub in servers:
                started = time.perf_counter()
                t = stub.Detect(pb.DetectRequest(image=image)).timings
                client = (time.perf_counter() - started) * 1e3
                stages = (t.decode_ms + t.preprocess_ms + t.backbone_ms
                          + sum(h.inference_ms for h in t.heads) + t.postprocess_ms)
                if turn >= 5:  # the first calls warm the server up
                    samples[binary].append((client, t.total_ms, t.total_ms - stages,
                                            client - t.total_ms))
        print(f"{'server':<50}{'client':>10}{'server':>10}{'outside':>10}{'client-server':>15}")
        for binary, rows in samples.items():
            client, total, outside, transport = (statistics.median(c) for c in zip(*rows))
            print(f"{binary[-50:]:<50}{client:>10.2f}{total:>10.2f}{outside:>10.3f}{transport:>15.2f}")
    finally:
        for _, process, _ in servers:
            process.terminate()
            process.wait()


if __name__ == "__main__":
    main()
