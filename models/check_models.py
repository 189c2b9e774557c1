#!/usr/bin/env python3
"""Check a polyhead model set with onnxruntime.

For every head, runs backbone → head on a seeded random input and compares each output with the
head's monolithic reference model (reference_<head>.onnx), then times the backbone on one thread.
With --image (an 8-bit RGB/RGBA PNG), also preprocesses the image as the server does (letterbox,
normalisation) and summarises what the heads predict on it.

    python models/check_models.py /tmp/demo-tiny --image photo.png
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
import tomllib
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

TOLERANCE = 1e-4


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session; `threads` = 0 lets onnxruntime choose."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_png(path: Path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB or RGBA PNG into an [H, W, 3] uint8 array."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in (2, 6) or interlace:
        raise ValueError(f"{path}: only 8-bit non-interlaced RGB/RGBA PNGs are supported")
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.int32)
    prev = np.zeros(width * bpp, np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 2:
            cur = (line + prev) & 0xFF
        else:  # Sub, Average and Paeth depend on the reconstructed left neighbour.
            cur = np.zeros_like(line)
            for x in range(line.size):
                a = cur[x - bpp] if x >= bpp else 0
                b = prev[x]
                c = prev[x - bpp] if x >= bpp else 0
                if kind == 1:
                    pred = a
                elif kind == 3:
                    pred = (a + b) // 2
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[x] = (line[x] + pred) & 0xFF
        out[y], prev = cur, cur
    return out.reshape(height, width, bpp)[:, :, :3].astype(np.uint8)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an [H, W, C] image with half-pixel centres (float32 result)."""

    def grid(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = grid(height, image.shape[0])
    x0, x1, fx = grid(width, image.shape[1])
    img = image.astype(np.float32)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def preprocess(image: np.ndarray, backbone: dict) -> np.ndarray:
    """Letterbox and normalise an [H, W, 3] uint8 image into [1, 3, H_in, W_in] (CONTRACT.md)."""
    if backbone["resize"] != "letterbox":
        raise ValueError("only letterbox preprocessing is implemented here")
    h_in, w_in = backbone["input_size"]
    h, w = image.shape[:2]
    scale = min(h_in / h, w_in / w)
    new_h, new_w = round(h * scale), round(w * scale)
    canvas = np.full((h_in, w_in, 3), float(backbone["pad_value"]), np.float32)
    pad_y, pad_x = (h_in - new_h) // 2, (w_in - new_w) // 2
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resize_bilinear(image, new_h, new_w)
    mean = np.asarray(backbone["mean"], np.float32)
    std = np.asarray(backbone["std"], np.float32)
    return ((canvas / 255.0 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


def head_batch(head: dict, batch: int) -> int:
    """Batch size fed to a head: the clip length for action heads."""
    return head["params"].get("frames", 8) if head["kind"] == "action" else batch


def check_consistency(root: Path, manifest: dict, batch: int, seed: int) -> float:
    """Compare backbone → head with the reference model of every head; returns the worst diff."""
    bb = manifest["backbone"]
    backbone = session(root / bb["file"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for head in manifest["heads"]:
        n = head_batch(head, batch)
        pixels = rng.normal(0.0, 1.0, (n, 3, *bb["input_size"])).astype(np.float32)
        feats = dict(
            zip(
                [o.name for o in backbone.get_outputs()],
                backbone.run(None, {bb["input"]: pixels}),
                strict=True,
            )
        )
        split_sess = session(root / head["file"])
        split = split_sess.run(None, {name: feats[name] for name in head["inputs"]})
        ref_sess = session(root / f"reference_{head['name']}.onnx")
        fused = ref_sess.run(None, {bb["input"]: pixels})
        for out, a, b in zip(split_sess.get_outputs(), split, fused, strict=True):
            diff = float(np.max(np.abs(a - b)))
            worst = max(worst, diff)
            finite = bool(np.isfinite(a).all())
            print(
                f"  {head['name']:>12}.{out.name:<12} {str(list(a.shape)):<20} "
                f"max|split-ref| = {diff:.2e}  std = {a.std():.3f}  finite = {finite}"
            )
    return worst


def time_backbone(root: Path, manifest: dict, repeats: int) -> float:
    """Median milliseconds of one single-image backbone run on one thread."""
    bb = manifest["backbone"]
    backbone = session(root / bb["file"], threads=1)
    pixels = np.random.default_rng(0).normal(0.0, 1.0, (1, 3, *bb["input_size"])).astype(np.float32)
    backbone.run(None, {bb["input"]: pixels})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backbone.run(None, {bb["input"]: pixels})
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def summarise_image(root: Path, manifest: dict, image_path: Path) -> None:
    """Print what each head predicts on one image (the action head sees it as a still clip)."""
    bb = manifest["backbone"]
    pixels = preprocess(read_png(image_path), bb)
    backbone = session(root / bb["file"])
    feats = dict(
        zip([o.name for o in backbone.get_outputs()], backbone.run(None, {bb["input"]: pixels}), strict=True)
    )
    for head in manifest["heads"]:
        labels = (root / head["labels"]).read_text().splitlines()
        sess = session(root / head["file"])
        n = head_batch(head, 1)
        inputs = {name: np.repeat(feats[name], n, axis=0) for name in head["inputs"]}
        outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs), strict=True))
        if head["kind"] == "detection":
            scores, boxes = outputs["scores"][0], outputs["boxes"][0]
            hits = np.argwhere(scores > head["params"]["score_threshold"])
            classes = sorted({labels[c] for _, c in hits})
            print(
                f"  detection: {len(hits)} (anchor, class) pairs over the threshold, "
                f"{len(set(hits[:, 0]))} anchors; classes {classes}"
            )
            print(
                f"  detection: boxes ltrb median {np.median(boxes):.2f}, "
                f"5-95% {np.percentile(boxes, 5):.2f}..{np.percentile(boxes, 95):.2f}"
            )
        elif head["kind"] == "segmentation":
            winners = outputs["logits"][0].argmax(axis=0)
            ids, counts = np.unique(winners, return_counts=True)
            order = np.argsort(-counts)
            share = ", ".join(f"{labels[ids[i]]} {counts[i] / winners.size:.0%}" for i in order[:8])
            print(f"  segmentation: {len(ids)} classes win: {share}")
        else:
            logits = outputs["logits"][0]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            top = np.argsort(-probs)[:3]
            print("  action: top-3 " + ", ".join(f"{labels[i]} {probs[i]:.3f}" for i in top))


def main() -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="model set directory (holding polyhead.toml)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the consistency check")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input")
    parser.add_argument("--repeats", type=int, default=20, help="timed backbone runs")
    parser.add_argument("--image", type=Path, help="PNG image to summarise the predictions on")
    args = parser.parse_args()

    manifest = tomllib.loads((args.dir / "polyhead.toml").read_text())
    print(f"{manifest.get('name', args.dir.name)}: backbone → head vs reference")
    worst = check_consistency(args.dir, manifest, args.batch, args.seed)
    ms = time_backbone(args.dir, manifest, args.repeats)
    print(f"backbone: {ms:.2f} ms/image (batch 1, 1 thread, median of {args.repeats})")
    if args.image:
        print(f"predictions on {args.image}:")
        summarise_image(args.dir, manifest, args.image)
    if worst > TOLERANCE:
        print(f"FAIL: max difference {worst:.2e} exceeds {TOLERANCE:.0e}")
        return 1
    print(f"OK: max difference {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
