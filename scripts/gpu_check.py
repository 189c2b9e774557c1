#!/usr/bin/env python3
"""End-to-end check of the CUDA path: real server binary, real CLI client, real media.

Starts three servers in turn, each a fresh process with the feature cache off
(`--cache-bytes 0`, so every request runs the backbone):

  A  --device cuda --feature-placement device   features stay in GPU memory
  B  --device cuda --feature-placement host     features are copied to host arrays
  C  --device cpu                               the reference
  D  --device cuda, the feature cache on        a Segment after a Detect of the same
                                                image reuses the GPU-resident features

and sends one request per RPC through `polyhead ... --json`: detect --masks,
segment (label map written as PNG), analyze (every detection and segmentation
head), video (one clip), video in sliding windows, models. Then it scrapes
`/metrics`. Checks, each printed as PASS/FAIL:

  A  the models run on the GPU (`cuda:0`); every image response's timings say
     feature_memory == "cuda:0"; polyhead_feature_device_to_host_bytes_total
     is 0 and polyhead_backbone_passes_total > 0
  B  feature_memory == "host" and the device-to-host byte counter is > 0
  C  feature_memory == "cpu"
  A and B agree with C: detections of detect and analyze (count, boxes within
  1e-2 x image size, scores within 1e-2); segment's label maps (the PNG that
  `segment --out` writes, decoded with zlib) equal on >= 99% of pixels, and
  analyze's per-class pixel fractions (its JSON holds no label map) within
  1e-2; the clip's top-1 label and top-k scores (within 1e-2); every window's
  top-1 and scores. A top-1 may differ only where the reference's first two
  scores tie (closer than 1e-4).

Video responses' feature_memory is checked where they carry it; the image
responses must.

Exit status 1 when any check fails. Standard library only (Python 3.10+).

Run from the repository root on a machine with an NVIDIA GPU:

    python3 scripts/gpu_check.py --image photo.png --video clip.mp4 \
        --ort-dylib /path/to/libonnxruntime.so.1.x [--json report.json]

ONNX Runtime must be the onnxruntime-gpu build (its libonnxruntime.so next to
libonnxruntime_providers_cuda.so and libonnxruntime_providers_shared.so), and
the CUDA 12/13 runtime, cuBLAS, cuFFT, cuRAND and cuDNN libraries must be on
LD_LIBRARY_PATH.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

D2H = "polyhead_feature_device_to_host_bytes_total"
PASSES = "polyhead_backbone_passes_total"
TOL = 1e-2

checks: list[dict] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    checks.append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def device_label(device: str) -> str:
    """The name the server reports for a --device value: `cuda` means GPU 0."""
    return "cuda:0" if device == "cuda" else device


def parse_json(text: str):
    """One JSON document, or JSON lines (the windows stream) as a list."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


class Server:
    def __init__(self, args, extra: list[str], log_dir: Path, tag: str, cache: bool = False):
        self.grpc, self.metrics = free_ports(2)
        self.client, self.addr = args.client, f"127.0.0.1:{self.grpc}"
        no_cache = [] if cache else ["--cache-bytes", "0", "--device-cache-bytes", "0"]
        cmd = [args.server, "--models", args.models, *no_cache,
               "--listen", self.addr, "--metrics-listen", f"127.0.0.1:{self.metrics}",
               "--drain-timeout-seconds", "2", *extra]
        if args.ort_dylib:
            cmd += ["--ort-dylib", args.ort_dylib]
        self.cmd = cmd
        self.log = open(log_dir / f"server-{tag}.log", "w+b")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def log_tail(self, n: int = 25) -> str:
        self.log.flush()
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float) -> str | None:
        """None once `models` answers; otherwise why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"server exited with status {self.proc.returncode}:\n{self.log_tail()}"
            probe = subprocess.run([self.client, "--server", self.addr, "--timeout", "2",
                                    "--retries", "0", "--json", "models"], capture_output=True)
            if probe.returncode == 0:
                return None
            time.sleep(0.5)
        return f"server not ready after {timeout:.0f}s:\n{self.log_tail()}"

    def call(self, *argv: str):
        r = subprocess.run([self.client, "--server", self.addr, "--timeout", "300", "--json", *argv],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"polyhead {' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return parse_json(r.stdout)

    def scrape(self) -> dict[str, list[tuple[str, float]]]:
        """Prometheus text as {metric name: [(labels, value)]}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, list[tuple[str, float]]] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            out.setdefault(name, []).append(("{" + labels if labels else "", float(value)))
        return out

    def stop(self) -> int | None:
        """SIGTERM, then the exit status (None when it had to be killed)."""
        self.proc.terminate()
        try:
            status = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            status = None
        self.log.close()
        return status


def find_key(obj, key: str) -> list:
    """Every value stored under `key`, at any depth."""
    if isinstance(obj, dict):
        return ([obj[key]] if key in obj else []) + [v for x in obj.values() for v in find_key(x, key)]
    if isinstance(obj, list):
        return [v for x in obj for v in find_key(x, key)]
    return []


def read_png_labels(path: Path) -> tuple[int, int, bytes]:
    """Decode an 8-bit greyscale PNG (the segment label map) with zlib alone."""
    data = path.read_bytes()
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big")
            if body[8:10] != b"\x08\x00" or body[12] != 0:
                raise ValueError(f"{path}: not an 8-bit greyscale, non-interlaced PNG")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, out, prev = zlib.decompress(idat), bytearray(), bytearray(width)
    for y in range(height):
        f, row = raw[y * (width + 1)], bytearray(raw[y * (width + 1) + 1:(y + 1) * (width + 1)])
        for x in range(width if f else 0):
            a, b = row[x - 1] if x else 0, prev[x]
            c = prev[x - 1] if x else 0
            if f == 1:
                row[x] = (row[x] + a) & 255
            elif f == 2:
                row[x] = (row[x] + b) & 255
            elif f == 3:
                row[x] = (row[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[x] = (row[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += row
        prev = row
    return width, height, bytes(out)


def run_config(args, tag: str, extra: list[str], work: Path) -> dict | None:
    print(f"\n== {tag}: {' '.join(extra)}", flush=True)
    srv = Server(args, extra, work, tag)
    started = False
    try:
        why = srv.wait_ready(args.timeout)
        if not check(f"{tag}: server starts", why is None, why or ""):
            return None
        started = True
        models = srv.call("models")
        image_heads = [h["name"] for h in models.get("heads", [])
                       if h.get("kind") in ("HEAD_KIND_DETECTION", "HEAD_KIND_SEGMENTATION")]
        seg_png = work / f"segment-{tag}.png"
        r = {"models": models,
             "detect": srv.call("detect", "--masks", args.image),
             "segment": srv.call("segment", "--out", str(seg_png), args.image),
             "analyze": srv.call("analyze", *[a for h in image_heads for a in ("--head", h)], args.image),
             "video": srv.call("video", args.video),
             "windows": srv.call("video", "--window", "8", "--window-stride", "4", args.video)}
        metrics = srv.scrape()
        return {"server": srv.cmd, "responses": r, "label_map": read_png_labels(seg_png),
                "metrics": {k: v for k, v in metrics.items() if k.startswith("polyhead_")}}
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        check(f"{tag}: requests", False, f"{e}\n{srv.log_tail()}")
        return None
    finally:
        status = srv.stop()
        if started:
            # The features it still holds (cache, handles) are freed on the way out.
            check(f"{tag}: server exits 0 after SIGTERM", status == 0, f"status {status}")


def check_device_cache(args, work: Path, want: str) -> None:
    """D: the feature cache on (its device budget): a Segment after a Detect of the same image
    takes the features the Detect left in GPU memory, and none go to the host."""
    print("\n== D: --device {} with the device feature cache".format(args.device), flush=True)
    srv = Server(args, ["--device", args.device], work, "D", cache=True)
    started = False
    try:
        why = srv.wait_ready(args.timeout)
        if not check("D: server starts", why is None, why or ""):
            return
        started = True
        srv.call("detect", args.image)
        seg = srv.call("segment", args.image)
        cached, memory = find_key(seg, "features_cached"), find_key(seg, "feature_memory")
        check("D: a Segment after a Detect reuses the features cached in GPU memory",
              cached == [True] and memory == [want], f"features_cached {cached}, feature_memory {memory}")
        m = srv.scrape()
        held = sum(v for _, v in m.get("polyhead_feature_cache_bytes", []))
        check("D: polyhead_feature_cache_bytes > 0", held > 0, f"{held:.0f} bytes")
        d2h = sum(v for _, v in m.get(D2H, [(None, float("nan"))]))
        check(f"D: {D2H} == 0", d2h == 0, f"{d2h:.0f} bytes")
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        check("D: requests", False, f"{e}\n{srv.log_tail()}")
    finally:
        status = srv.stop()
        if started:
            check("D: server exits 0 after SIGTERM", status == 0, f"status {status}")


def metric(res: dict, name: str) -> float | None:
    series = res["metrics"].get(name)
    return None if series is None else sum(v for _, v in series)


def check_config(tag: str, res: dict, want_memory: str, want_device: str | None):
    r = res["responses"]
    if want_device is not None:
        seen = set(find_key(r["models"], "execution_provider"))
        if not seen:  # fall back to the model_info metric's labels
            seen = {lab.split('execution_provider="')[1].split('"')[0]
                    for lab, _ in res["metrics"].get("polyhead_model_info", []) if "execution_provider" in lab}
        check(f"{tag}: models run on {want_device}", seen == {want_device}, f"reported {sorted(seen)}")
    for rpc in ("detect", "segment", "analyze", "video", "windows"):
        found = find_key(r[rpc], "feature_memory")
        if not found and rpc in ("video", "windows"):
            continue  # only the image RPCs must report it
        check(f"{tag}: {rpc} timings feature_memory == {want_memory!r}",
              bool(found) and set(found) == {want_memory},
              f"got {sorted(set(found))}" if found else "no `feature_memory` in the response's timings")


def det_list(resp) -> tuple[list, int]:
    d = find_key(resp, "detections")
    d = next(x for x in d if isinstance(x, dict))
    return d.get("detections", []), max(d.get("image_width", 1), d.get("image_height", 1))


def compare_detections(name: str, got, ref) -> None:
    (a, size), (b, _) = det_list(got), det_list(ref)
    if not check(f"{name}: detection count", len(a) == len(b), f"{len(a)} vs {len(b)}"):
        return
    worst_box = worst_score = 0.0
    unmatched, free = 0, list(a)
    for d in sorted(b, key=lambda d: -d["score"]):
        cands = [c for c in free if c["class_id"] == d["class_id"]]
        if not cands:
            unmatched += 1
            continue
        c = min(cands, key=lambda c: max(abs(c["box"][k] - d["box"][k]) for k in d["box"]))
        free.remove(c)
        worst_box = max(worst_box, max(abs(c["box"][k] - d["box"][k]) for k in d["box"]) / size)
        worst_score = max(worst_score, abs(c["score"] - d["score"]))
    check(f"{name}: detections match", unmatched == 0 and worst_box <= TOL and worst_score <= TOL,
          f"unmatched {unmatched}, box diff {worst_box:.2e} x size, score diff {worst_score:.2e}")


def top(resp) -> list:
    return find_key(resp, "actions")[0]["top"]


def compare_top(a: list, b: list) -> tuple[bool, float]:
    """Same top-1 (a tie in the reference, gap < 1e-4, may flip); shared labels' scores' worst diff."""
    same = a[0]["class_id"] == b[0]["class_id"] or (len(b) > 1 and b[0]["score"] - b[1]["score"] < 1e-4
                                                  and a[0]["class_id"] == b[1]["class_id"])
    sb = {x["class_id"]: x["score"] for x in b}
    return same, max([abs(x["score"] - sb[x["class_id"]]) for x in a if x["class_id"] in sb] or [0.0])


def compare(tag: str, res: dict, ref: dict) -> None:
    name, r, c = f"{tag} vs C", res["responses"], ref["responses"]
    compare_detections(f"{name} detect", r["detect"], c["detect"])
    compare_detections(f"{name} analyze", r["analyze"], c["analyze"])
    (w, h, la), (w2, h2, lc) = res["label_map"], ref["label_map"]
    if check(f"{name}: segment label map size", (w, h) == (w2, h2), f"{w}x{h} vs {w2}x{h2}"):
        same = sum(x == y for x, y in zip(la, lc)) / len(la)
        check(f"{name}: segment label maps agree on >= 99% of pixels", same >= 0.99, f"{same:.4%}")
    # analyze's segmentation carries no label map: compare its per-class pixel fractions
    fa = {p["class_id"]: p["fraction"] for p in find_key(r["analyze"], "present")[0]}
    fc = {p["class_id"]: p["fraction"] for p in find_key(c["analyze"], "present")[0]}
    worst = max(abs(fa.get(k, 0.0) - fc.get(k, 0.0)) for k in fa.keys() | fc.keys())
    check(f"{name}: analyze segmentation class fractions within 1e-2", worst <= TOL, f"worst {worst:.2e}")
    same, diff = compare_top(top(r["video"]), top(c["video"]))
    check(f"{name}: video top-1 and scores", same and diff <= TOL,
          f"{top(r['video'])[0]['label']} vs {top(c['video'])[0]['label']}, score diff {diff:.2e}")
    wa = [x for x in r["windows"] if "window" in x]
    wc = [x for x in c["windows"] if "window" in x]
    if check(f"{name}: window count", len(wa) == len(wc), f"{len(wa)} vs {len(wc)}"):
        results = [compare_top(top(x), top(y)) for x, y in zip(wa, wc)]
        bad = [x["window"] for x, (s, _) in zip(wa, results) if not s]
        worst = max(d for _, d in results) if results else 0.0
        check(f"{name}: every window's top-1 and scores", not bad and worst <= TOL,
              f"differing windows {bad[:10]}, score diff {worst:.2e}")


def timing_rows(tag: str, res: dict) -> list[tuple]:
    rows = []
    for rpc in ("detect", "segment", "analyze", "video", "windows"):
        resp = res["responses"][rpc]
        t = (resp[-1] if isinstance(resp, list) else resp).get("timings", {})
        rows.append((tag, rpc, t.get("total_ms", float("nan")), t.get("backbone_ms", float("nan")),
                     t.get("feature_memory", "-")))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default="target/release/polyhead-server", help="server binary")
    p.add_argument("--client", default="target/release/polyhead", help="CLI client binary")
    p.add_argument("--models", default="models/generated/tiny", help="model set directory")
    p.add_argument("--image", required=True, help="a real photo (JPEG/PNG/WebP)")
    p.add_argument("--video", required=True, help="a short video clip (MP4, WebM, ...)")
    p.add_argument("--ort-dylib", help="onnxruntime-gpu's libonnxruntime.so, passed to the server")
    p.add_argument("--device", default="cuda", help="GPU device for configs A and B (default: cuda)")
    p.add_argument("--json", metavar="OUT", help="write every response and check to this file")
    p.add_argument("--timeout", type=float, default=180, help="seconds each server may take to start")
    args = p.parse_args()

    want = device_label(args.device)
    configs = [("A", ["--device", args.device, "--feature-placement", "device"]),
               ("B", ["--device", args.device, "--feature-placement", "host"]),
               ("C", ["--device", "cpu"])]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        results = {tag: run_config(args, tag, extra, Path(tmp)) for tag, extra in configs}
        check_device_cache(args, Path(tmp), want)

    print("\n== checks")
    a, b, c = results["A"], results["B"], results["C"]
    if a:
        check_config("A", a, want, want)
        d2h, passes = metric(a, D2H), metric(a, PASSES)
        check(f"A: {D2H} == 0", d2h == 0, "metric missing" if d2h is None else f"{d2h:.0f} bytes")
        check(f"A: {PASSES} > 0", bool(passes), "metric missing" if passes is None else f"{passes:.0f}")
    if b:
        check_config("B", b, "host", None)
        d2h = metric(b, D2H)
        check(f"B: {D2H} > 0", bool(d2h), "metric missing" if d2h is None else f"{d2h:.0f} bytes")
    if c:
        check_config("C", c, "cpu", "cpu")
    for tag, res in (("A", a), ("B", b)):
        if res and c:
            compare(tag, res, c)
        else:
            check(f"{tag} vs C agreement", False, "skipped: a configuration has no results")

    rows = [row for tag, res in results.items() if res for row in timing_rows(tag, res)]
    print(f"\n{'config':<7}{'rpc':<10}{'total_ms':>10}{'backbone_ms':>13}  feature_memory")
    for tag, rpc, total, backbone, memory in rows:
        print(f"{tag:<7}{rpc:<10}{total:>10.1f}{backbone:>13.1f}  {memory}")
    failed = [x for x in checks if not x["ok"]]
    print(f"\n{len(checks) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        report = {"checks": checks, "configs": {t: r and {k: v for k, v in r.items() if k != "label_map"}
                                                for t, r in results.items()}}
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
