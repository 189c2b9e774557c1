#!/usr/bin/env python3
"""Soak test: minutes of mixed load with random cancellations against polyhead; reports the
server's RSS growth and every status a call was not allowed to return.

Usage: scripts/soak.py [--seconds 300] [--concurrency 8] [--warmup-seconds 120]
                       [--max-growth-mb 50] [--json PATH] [--server ADDR --pid PID]

Without `--server` it starts `target/release/polyhead-server` on the demo models on a free
loopback port (its log goes to a file next to the generated inputs), and stops it with SIGTERM at
the end. With `--server ADDR` it loads a running server; `--pid PID` names that server's process
so that its RSS can be sampled.

Workers call, at random: Detect, Segment, Analyze (detection + segmentation), ExtractFeatures
then Detect by the feature handle, RecognizeAction on a short clip (made once with the ffmpeg
CLI) and on a list of encoded frames, ListModels, hostile inputs (a truncated JPEG, random bytes
as an image or as a clip: INVALID_ARGUMENT; an unknown feature handle: NOT_FOUND), calls given a
tiny deadline (DEADLINE_EXCEEDED allowed) and calls cancelled by the client (CANCELLED allowed).
Any call may be refused with RESOURCE_EXHAUSTED under overload; that is allowed but counted.
Every other status is unexpected and is reported with its message.

RSS (VmRSS of /proc/PID/status) is sampled every second. The first `--warmup-seconds` are
warm-up; growth = the highest RSS after warm-up - the RSS at the end of warm-up.
Exit status: 0 when no call had an unexpected status, the server stayed up (and, when started
here, exited 0) and the growth is at most `--max-growth-mb`; 1 otherwise.
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
SERVER_BIN = ROOT / "target" / "release" / "polyhead-server"
PHOTOS = ROOT / ".cache" / "testdata"
MB = 1024 * 1024

# Server flags used when the soak starts the server itself: bounded feature cache and handle
# budgets small against the growth target, so that they fill during warm-up and what grows after
# it is not a cache doing its job.
DEFAULT_SERVER_ARGS = ["--cache-bytes", str(16 * MB), "--handle-bytes", str(16 * MB)]

# Deadline of the calls that are not meant to be cut short: far beyond any answer, so that a
# slow answer on a busy machine is not mistaken for a cancellation.
NORMAL_TIMEOUT_S = 120.0

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
CANCELLED = grpc.StatusCode.CANCELLED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

# Call kind -> (weight in the random mix, statuses it may return besides RESOURCE_EXHAUSTED).
KINDS = {
    "detect": (3.0, {OK}),
    "segment": (2.0, {OK}),
    "analyze": (2.0, {OK}),
    "extract_then_detect": (2.0, {OK}),
    "action_video": (1.0, {OK}),
    "action_frames": (1.0, {OK}),
    "list_models": (1.0, {OK}),
    "hostile_truncated_jpeg": (1.0, {INVALID}),
    "hostile_random_bytes": (1.0, {INVALID}),
    "unknown_handle": (0.5, {NOT_FOUND}),
    "tiny_deadline": (1.5, {OK, DEADLINE}),
    "client_cancel": (1.5, {OK, CANCELLED}),
}


def load_stubs(out: Path):
    """Python stubs for polyhead.v1, generated from the repository's proto with grpcio-tools."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
         f"--grpc_python_out={out}", "polyhead/v1/polyhead.proto"],
        check=True,
    )
    sys.path.insert(0, str(out))
    from polyhead.v1 import polyhead_pb2, polyhead_pb2_grpc

    return polyhead_pb2, polyhead_pb2_grpc


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


class Inputs:
    """The requests' payloads, made once: photo variants, a clip, its frames, hostile bytes."""

    def __init__(self, work: Path):
        photos = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg", ".jpeg"))
        if not photos:
            raise SystemExit(f"no test photos in {PHOTOS}: run `make setup`")
        self.images = []
        for photo in photos:
            self.images.append(photo.read_bytes())
            for i, (width, ext) in enumerate([(320, "jpg"), (200, "png"), (640, "jpg")]):
                out = work / f"{photo.stem}_{i}.{ext}"
                ffmpeg("-i", str(photo), "-vf", f"scale={width}:-2", str(out))
                self.images.append(out.read_bytes())
        clip = work / "clip.mp4"
        ffmpeg("-f", "lavfi", "-i", "testsrc=duration=2:size=160x120:rate=12",
               "-c:v", "libx264", "-pix_fmt", "yuv420p", str(clip))
        self.clip = clip.read_bytes()
        ffmpeg("-i", str(clip), "-vf", "fps=4", str(work / "frame_%02d.jpg"))
        self.frames = [f.read_bytes() for f in sorted(work.glob("frame_*.jpg"))]
        jpeg = next((p for p in photos if p.suffix in (".jpg", ".jpeg")), None)
        jpeg_bytes = jpeg.read_bytes() if jpeg else (work / f"{photos[0].stem}_0.jpg").read_bytes()
        self.truncated_jpeg = jpeg_bytes[: len(jpeg_bytes) // 3]


class Server:
    """A `polyhead-server` started for the soak, logging to a file."""

    def __init__(self, models: str, extra_args, log_path: Path):
        self.address = f"127.0.0.1:{free_port()}"
        metrics = f"127.0.0.1:{free_port()}"
        args = [str(SERVER_BIN), "--listen", self.address, "--models", models,
                "--metrics-listen", metrics, *extra_args]
        self.log = open(log_path, "w")
        self.log_path = log_path
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"polyhead-server exited with {self.process.returncode}; "
                                 f"log: {self.log_path}")
            try:
                with grpc.insecure_channel(self.address) as channel:
                    status = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"polyhead-server at {self.address} never became SERVING")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log.close()
        return code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    def __init__(self, pid: int, started: float):
        super().__init__(daemon=True)
        self.pid, self.started = pid, started
        self.samples = []  # (seconds since start, bytes)
        self.stopping = threading.Event()

    def run(self):
        while True:
            rss = rss_bytes(self.pid)
            if rss is not None:
                self.samples.append((time.monotonic() - self.started, rss))
            if self.stopping.wait(1.0):
                return


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.statuses = defaultdict(Counter)  # kind -> status name -> count
        self.latencies = defaultdict(list)  # kind -> seconds
        self.unexpected = Counter()  # (kind, status, message) -> count

    def record(self, kind, code, message, seconds):
        allowed = KINDS[kind][1] | {EXHAUSTED}
        with self.lock:
            self.statuses[kind][code.name] += 1
            self.latencies[kind].append(seconds)
            if code not in allowed:
                self.unexpected[(kind, code.name, message or "")] += 1


class Worker:
    def __init__(self, address, pb, pb_grpc, inputs, stats, rng, schedule):
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.PolyheadStub(self.channel)
        self.pb, self.inputs, self.stats, self.rng, self.schedule = pb, inputs, stats, rng, schedule
        names = list(KINDS)
        self.names, self.weights = names, [KINDS[n][0] for n in names]

    # Payloads.
    def image(self):
        pb, rng = self.pb, self.rng
        if rng.random() < 0.2:
            # Fresh pixels: a feature-cache miss that runs the backbone.
            width, height = rng.randint(32, 400), rng.randint(32, 400)
            return pb.Image(raw=pb.RawImage(width=width, height=height,
                                            rgb=rng.randbytes(width * height * 3)))
        return pb.Image(encoded=rng.choice(self.inputs.images))

    def detect_request(self, image=None):
        pb, rng = self.pb, self.rng
        options = pb.DetectOptions(masks=rng.random() < 0.3,
                                   max_detections=rng.choice([0, 5, 50]))
        if rng.random() < 0.5:
            options.score_threshold = rng.uniform(0.05, 0.6)
        return pb.DetectRequest(image=image or self.image(), options=options)

    def action_request(self, video: bool):
        pb, rng = self.pb, self.rng
        options = pb.ActionOptions(num_frames=rng.choice([0, 4, 8]), top_k=rng.choice([0, 3, 10]))
        if video:
            return pb.RecognizeActionRequest(video=self.inputs.clip, options=options)
        frames = pb.EncodedFrames(frames=self.inputs.frames, fps=4.0)
        return pb.RecognizeActionRequest(frames=frames, options=options)

    def heavy_call(self):
        """A call that takes a while: the target of deadlines and cancellations."""
        pb, rng = self.pb, self.rng
        choice = rng.randrange(4)
        if choice == 0:
            return self.stub.Segment, pb.SegmentRequest(image=self.image())
        if choice == 1:
            return self.stub.Analyze, pb.AnalyzeRequest(
                image=self.image(), heads=["detection", "segmentation"])
        if choice == 2:
            return self.stub.RecognizeAction, self.action_request(video=True)
        return self.stub.Detect, self.detect_request()

    # Calls: each returns (status code, message).
    def call(self, kind):
        pb, stub, rng = self.pb, self.stub, self.rng
        t = NORMAL_TIMEOUT_S
        try:
            if kind == "detect":
                stub.Detect(self.detect_request(), timeout=t)
            elif kind == "segment":
                stub.Segment(pb.SegmentRequest(image=self.image()), timeout=t)
            elif kind == "analyze":
                stub.Analyze(pb.AnalyzeRequest(image=self.image(),
                                               heads=["detection", "segmentation"]), timeout=t)
            elif kind == "extract_then_detect":
                extracted = stub.ExtractFeatures(pb.ExtractFeaturesRequest(image=self.image()),
                                                 timeout=t)
                handle = pb.Image(feature_handle=extracted.handle)
                stub.Detect(self.detect_request(handle), timeout=t)
            elif kind == "action_video":
                stub.RecognizeAction(self.action_request(video=True), timeout=t)
            elif kind == "action_frames":
                stub.RecognizeAction(self.action_request(video=False), timeout=t)
            elif kind == "list_models":
                stub.ListModels(pb.ListModelsRequest(), timeout=t)
            elif kind == "hostile_truncated_jpeg":
                image = pb.Image(encoded=self.inputs.truncated_jpeg)
                self.hostile_image_call(image, t)
            elif kind == "hostile_random_bytes":
                junk = rng.randbytes(rng.randint(1, 64 * 1024))
                if rng.random() < 0.3:
                    stub.RecognizeAction(pb.RecognizeActionRequest(video=junk), timeout=t)
                else:
                    self.hostile_image_call(pb.Image(encoded=junk), t)
            elif kind == "unknown_handle":
                image = pb.Image(feature_handle=rng.randbytes(16).hex())
                stub.Detect(pb.DetectRequest(image=image), timeout=t)
            elif kind == "tiny_deadline":
                method, request = self.heavy_call()
                # 1 ms to 300 ms, log-uniform: most run out, some are answered in time.
                method(request, timeout=10 ** rng.uniform(-3, -0.5))
            elif kind == "client_cancel":
                method, request = self.heavy_call()
                future = method.future(request, timeout=t)
                time.sleep(rng.uniform(0.0, 0.2))
                future.cancel()
                try:
                    future.result()
                except grpc.FutureCancelledError:
                    return CANCELLED, "cancelled by the client"
            else:
                raise AssertionError(kind)
        except grpc.RpcError as error:
            return error.code(), error.details()
        return OK, ""

    def hostile_image_call(self, image, timeout):
        pb, stub = self.pb, self.stub
        choice = self.rng.randrange(4)
        if choice == 0:
            stub.Detect(pb.DetectRequest(image=image), timeout=timeout)
        elif choice == 1:
            stub.Segment(pb.SegmentRequest(image=image), timeout=timeout)
        elif choice == 2:
            stub.Analyze(pb.AnalyzeRequest(image=image, heads=["detection"]), timeout=timeout)
        else:
            stub.ExtractFeatures(pb.ExtractFeaturesRequest(image=image), timeout=timeout)

    def next_kind(self):
        with self.schedule["lock"]:
            if self.schedule["first"]:
                return self.schedule["first"].pop()
        return self.rng.choices(self.names, self.weights)[0]

    def run(self, until):
        while time.monotonic() < until:
            kind = self.next_kind()
            started = time.monotonic()
            try:
                code, message = self.call(kind)
            except Exception as error:  # a client-side failure is unexpected too
                code, message = grpc.StatusCode.UNKNOWN, f"client error: {error!r}"
            self.stats.record(kind, code, message, time.monotonic() - started)
        self.channel.close()


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def summarize(args, stats, sampler, warmup, elapsed, server_code, server_alive):
    samples = sampler.samples
    before = [rss for t, rss in samples if t <= warmup]
    after = [rss for t, rss in samples if t > warmup]
    warm_end = before[-1] if before else (after[0] if after else 0)
    rss = {
        "start_mb": samples[0][1] / MB if samples else 0.0,
        "warmup_end_mb": warm_end / MB,
        "max_after_warmup_mb": max(after) / MB if after else warm_end / MB,
        "final_mb": samples[-1][1] / MB if samples else 0.0,
        "samples": len(samples),
    }
    rss["growth_mb"] = rss["max_after_warmup_mb"] - rss["warmup_end_mb"]
    calls = {}
    for kind in KINDS:
        lat = stats.latencies.get(kind, [])
        calls[kind] = {
            "calls": len(lat),
            "statuses": dict(stats.statuses.get(kind, {})),
            "p50_ms": 1000 * statistics.median(lat) if lat else 0.0,
            "p99_ms": 1000 * percentile(lat, 0.99),
            "max_ms": 1000 * max(lat) if lat else 0.0,
        }
    unexpected = [
        {"kind": kind, "status": code, "message": message, "count": count}
        for (kind, code, message), count in stats.unexpected.most_common()
    ]
    totals = Counter()
    for counter in stats.statuses.values():
        totals.update(counter)
    failures = []
    if unexpected:
        failures.append(f"{sum(u['count'] for u in unexpected)} unexpected statuses")
    if rss["growth_mb"] > args.max_growth_mb:
        failures.append(f"RSS grew {rss['growth_mb']:.1f} MB after warm-up "
                        f"(limit {args.max_growth_mb} MB)")
    if not samples:
        failures.append("no RSS samples")
    if not server_alive:
        failures.append("the server process died during the soak")
    if server_code not in (None, 0):
        failures.append(f"the server exited with {server_code} after SIGTERM")
    return {
        "seconds": args.seconds,
        "elapsed_s": elapsed,
        "concurrency": args.concurrency,
        "warmup_s": warmup,
        "seed": args.seed,
        "total_calls": sum(c["calls"] for c in calls.values()),
        "statuses": dict(totals),
        "resource_exhausted": totals.get("RESOURCE_EXHAUSTED", 0),
        "unexpected_total": sum(u["count"] for u in unexpected),
        "unexpected": unexpected,
        "calls": calls,
        "rss": rss,
        "rss_samples_mb": [[round(t, 1), round(b / MB, 2)] for t, b in samples],
        "max_growth_mb": args.max_growth_mb,
        "server_exit_code": server_code,
        "passed": not failures,
        "failures": failures,
    }


def print_report(report):
    print(f"\nsoak: {report['elapsed_s']:.0f} s, concurrency {report['concurrency']}, "
          f"warm-up {report['warmup_s']:.0f} s, {report['total_calls']} calls")
    print(f"{'kind':<24}{'calls':>7}{'p50 ms':>9}{'p99 ms':>9}  statuses")
    for kind, row in report["calls"].items():
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(row["statuses"].items()))
        print(f"{kind:<24}{row['calls']:>7}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}  {statuses}")
    rss = report["rss"]
    print(f"RSS MB: start {rss['start_mb']:.1f}, end of warm-up {rss['warmup_end_mb']:.1f}, "
          f"max after warm-up {rss['max_after_warmup_mb']:.1f}, final {rss['final_mb']:.1f}, "
          f"growth {rss['growth_mb']:.1f} (limit {report['max_growth_mb']})")
    print(f"RESOURCE_EXHAUSTED: {report['resource_exhausted']}; "
          f"unexpected statuses: {report['unexpected_total']}")
    for u in report["unexpected"]:
        print(f"  {u['count']}x {u['kind']}: {u['status']}: {u['message']}")
    print("PASS" if report["passed"] else "FAIL: " + "; ".join(report["failures"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the load")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent workers")
    parser.add_argument("--warmup-seconds", type=float, default=None,
                        help="warm-up excluded from the growth (default 120, at most two "
                             "fifths of --seconds): ONNX Runtime's arena grows until every "
                             "mix of batch sizes has been seen")
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--json", help="write the report as JSON to this path")
    parser.add_argument("--server", help="address of a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="process id of the --server, for its RSS")
    parser.add_argument("--models", default=os.environ.get(
        "POLYHEAD_MODELS", str(ROOT / "models" / "generated" / "tiny")))
    parser.add_argument("--server-arg", action="append", default=None,
                        help="flag for the started server, repeatable (default: "
                             + " ".join(DEFAULT_SERVER_ARGS) + ")")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    if args.server and args.pid is None:
        parser.error("--server needs --pid (the RSS is read from /proc/PID/status)")
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    warmup = args.warmup_seconds
    if warmup is None:
        warmup = min(120.0, args.seconds * 2 / 5)
    warmup = min(warmup, args.seconds / 2)

    work = Path(tempfile.mkdtemp(prefix="polyhead-soak-"))
    pb, pb_grpc = load_stubs(work / "stubs")
    inputs = Inputs(work)

    server = None
    if args.server:
        address, pid = args.server, args.pid
    else:
        if not SERVER_BIN.exists():
            raise SystemExit(f"{SERVER_BIN} is missing: run `make build`")
        server_args = args.server_arg if args.server_arg is not None else DEFAULT_SERVER_ARGS
        server = Server(args.models, server_args, work / "server.log")
        print(f"started polyhead-server (pid {server.process.pid}) at {server.address}; "
              f"log: {server.log_path}", flush=True)
        server.wait_serving()
        address, pid = server.address, server.process.pid

    stats = Stats()
    schedule = {"lock": threading.Lock(), "first": list(reversed(list(KINDS)))}
    rng = random.Random(args.seed)
    started = time.monotonic()
    sampler = RssSampler(pid, started)
    sampler.start()
    until = started + args.seconds
    workers = [Worker(address, pb, pb_grpc, inputs, stats, random.Random(rng.random()), schedule)
               for _ in range(args.concurrency)]
    threads = [threading.Thread(target=w.run, args=(until,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    print(f"soaking for {args.seconds:.0f} s with {args.concurrency} workers "
          f"(warm-up {warmup:.0f} s, seed {args.seed})", flush=True)
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    sampler.stopping.set()
    sampler.join()
    alive = rss_bytes(pid) is not None if server is None else server.process.poll() is None
    server_code = server.stop() if server else None

    report = summarize(args, stats, sampler, warmup, elapsed, server_code, alive)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if report["passed"]:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"inputs and server log kept in {work}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
