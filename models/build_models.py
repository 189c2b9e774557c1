#!/usr/bin/env python3
"""Build a deterministic demo model set for polyhead.

The set follows models/CONTRACT.md: a Swin-style hierarchical vision transformer backbone with four
feature maps (strides 4/8/16/32), a detection head, a segmentation head and an action head, each in
its own ONNX file, plus the manifest and label files.  For every head a monolithic reference model
(backbone and head fused into one graph) is written as well, so the split execution can be checked
against it (see check_models.py).

Only `onnx` and `numpy` are used.  Weights are random but fully determined by the seed and the
parameter's name, so the same seed always produces byte-identical files.  The outputs are
deterministic and well-formed, not meaningful.

    python models/build_models.py --preset tiny --out /tmp/demo-tiny
"""

from __future__ import annotations

import argparse
import math
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LABELS_DIR = Path(__file__).resolve().parent / "labels"

STAGE_NAMES = ("stage1", "stage2", "stage3", "stage4")
STAGE_STRIDES = (4, 8, 16, 32)
DETECTION_STRIDES = (8, 16, 32)
PROTO_STRIDE = 4
NUM_MASK_PROTOS = 32
NUM_COCO_CLASSES = 80
NUM_ADE_CLASSES = 150
NUM_KINETICS_CLASSES = 400
MAX_FRAMES = 64
# Detection class-logit bias: this many standard deviations below logit(score_threshold).
DETECTION_SIGMA = 3.4
# Detection ltrb bias before the softplus (softplus(1.5) ≈ 1.7 stride units).
BOX_BIAS = 1.5
# Strength of the segmentation head's class prior, −SEGMENTATION_PRIOR·log(1 + class id).
SEGMENTATION_PRIOR = 1.0


@dataclass(frozen=True)
class Preset:
    """Architecture hyper-parameters of one demo model set."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window: int
    mlp_ratio: int
    neck_width: int
    frames: int

    def stage_channels(self) -> list[int]:
        """Channels of stage1..stage4 (doubling at every patch merging)."""
        return [self.embed_dim * 2**i for i in range(len(self.depths))]


PRESETS = {
    "tiny": Preset(
        embed_dim=32,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 4, 8),
        window=7,
        mlp_ratio=2,
        neck_width=64,
        frames=8,
    ),
    "swin-t": Preset(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window=7,
        mlp_ratio=4,
        neck_width=128,
        frames=16,
    ),
}


class GraphBuilder:
    """Accumulates ONNX nodes and initializers; every parameter is seeded by (seed, name)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def _claim(self, name: str) -> str:
        """Reserve a tensor name; ONNX names must be unique within a graph."""
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._names.add(name)
        return name

    def rng(self, name: str) -> np.random.Generator:
        """A random generator determined by the seed and `name` only."""
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def const(self, name: str, value: np.ndarray) -> str:
        """Add a constant initializer and return its name."""
        self.initializers.append(numpy_helper.from_array(np.asarray(value), self._claim(name)))
        return name

    def ints(self, name: str, values: list[int]) -> str:
        """Add an int64 vector constant (shapes, axes, indices)."""
        return self.const(name, np.asarray(values, dtype=np.int64))

    def scalar(self, name: str, value: float) -> str:
        """Add a float32 scalar constant."""
        return self.const(name, np.asarray(value, dtype=np.float32))

    def normal(self, name: str, shape: tuple[int, ...], std: float) -> str:
        """Add a float32 parameter drawn from N(0, std²)."""
        value = self.rng(name).normal(0.0, std, size=shape).astype(np.float32)
        return self.const(name, value)

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        """Add a single-output node; its output tensor is called `name`."""
        self.nodes.append(helper.make_node(op_type, inputs, [self._claim(name)], name=name, **attrs))
        return name

    # Layers -------------------------------------------------------------------------------------

    def linear(
        self, x: str, name: str, c_in: int, c_out: int, bias: bool = True, output: str | None = None
    ) -> str:
        """x[..., c_in] @ W (+ b) with fan-in scaled normal weights and zero bias."""
        w = self.normal(f"{name}.weight", (c_in, c_out), 1.0 / math.sqrt(c_in))
        if not bias:
            return self.op("MatMul", [x, w], output or name)
        y = self.op("MatMul", [x, w], f"{name}.matmul")
        b = self.const(f"{name}.bias", np.zeros(c_out, np.float32))
        return self.op("Add", [y, b], output or name)

    def conv_params(
        self, name: str, c_in: int, c_out: int, kernel: int, bias_value: float | np.ndarray = 0.0
    ) -> tuple[str, str]:
        """Add conv weights (fan-in scaled normal) and bias; returns their names for sharing."""
        fan_in = c_in * kernel * kernel
        w = self.normal(f"{name}.weight", (c_out, c_in, kernel, kernel), 1.0 / math.sqrt(fan_in))
        b = self.const(f"{name}.bias", np.broadcast_to(np.asarray(bias_value, np.float32), (c_out,)).copy())
        return w, b

    def conv_apply(self, x: str, params: tuple[str, str], kernel: int, output: str, stride: int = 1) -> str:
        """2-D convolution (NCHW) with existing parameters; 'same' padding when stride is 1."""
        pad = (kernel - 1) // 2 if stride == 1 else 0
        return self.op(
            "Conv",
            [x, *params],
            output,
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad] * 4,
        )

    def conv(
        self,
        x: str,
        name: str,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int = 1,
        output: str | None = None,
    ) -> str:
        """2-D convolution with fresh parameters called `name`.*; the output is `output` or `name`."""
        params = self.conv_params(name, c_in, c_out, kernel)
        return self.conv_apply(x, params, kernel, output or name, stride)

    def layer_norm(self, x: str, name: str, dim: int, axis: int = -1) -> str:
        """LayerNormalization over the trailing axes starting at `axis` (gamma 1, beta 0)."""
        gamma = self.const(f"{name}.weight", np.ones(dim, np.float32))
        beta = self.const(f"{name}.bias", np.zeros(dim, np.float32))
        return self.op("LayerNormalization", [x, gamma, beta], name, axis=axis, epsilon=1e-5)

    def channel_norm(self, x: str, name: str, dim: int) -> str:
        """LayerNorm over the channel axis of an NCHW map."""
        t = self.op("Transpose", [x], f"{name}.nhwc", perm=[0, 2, 3, 1])
        t = self.layer_norm(t, f"{name}.ln", dim)
        return self.op("Transpose", [t], name, perm=[0, 3, 1, 2])

    def gelu(self, x: str, name: str) -> str:
        """Exact GELU, 0.5·x·(1 + erf(x/√2)), in the pattern onnxruntime fuses."""
        t = self.op("Div", [x, self.scalar(f"{name}.sqrt2", math.sqrt(2.0))], f"{name}.div")
        t = self.op("Erf", [t], f"{name}.erf")
        t = self.op("Add", [t, self.scalar(f"{name}.one", 1.0)], f"{name}.add")
        t = self.op("Mul", [x, t], f"{name}.mul")
        return self.op("Mul", [t, self.scalar(f"{name}.half", 0.5)], name)

    def reshape(self, x: str, name: str, shape: list[int]) -> str:
        """Reshape to a constant shape (-1 allowed, used for the dynamic batch)."""
        return self.op("Reshape", [x, self.ints(f"{name}.shape", shape)], name)

    def slice(self, x: str, name: str, start: int, end: int, axis: int) -> str:
        """x[start:end] along one axis."""
        bounds = [
            self.ints(f"{name}.{key}", [v]) for key, v in (("start", start), ("end", end), ("axis", axis))
        ]
        return self.op("Slice", [x, *bounds], name)

    def upsample(self, x: str, name: str, factor: int, mode: str) -> str:
        """Resize an NCHW map by an integer factor ('nearest' or 'linear', half-pixel)."""
        scales = self.const(f"{name}.scales", np.asarray([1, 1, factor, factor], np.float32))
        attrs = {"mode": mode}
        if mode == "nearest":
            attrs.update(coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        else:
            attrs.update(coordinate_transformation_mode="half_pixel")
        return self.op("Resize", [x, "", scales], name, **attrs)

    def model(
        self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
    ) -> onnx.ModelProto:
        """Wrap everything added so far into a checked ModelProto."""
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="polyhead-build-models",
            producer_version="1",
        )
        onnx.checker.check_model(model)
        return model


def tensor(name: str, shape: list) -> onnx.ValueInfoProto:
    """A float32 graph input/output; string dimensions are symbolic (dynamic)."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# Backbone -----------------------------------------------------------------------------------------


def relative_position_index(window: int) -> np.ndarray:
    """Swin's [window², window²] index into the (2·window−1)² relative position bias table."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]
    rel = rel.transpose(1, 2, 0) + (window - 1)
    return (rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]).astype(np.int64)


def shifted_window_mask(size: int, window: int, shift: int) -> np.ndarray:
    """Swin's additive attention mask [nW, 1, window², window²] for cyclically shifted windows."""
    regions = np.zeros((size, size), np.float32)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            regions[hs, ws] = label
            label += 1
    n = size // window
    windows = regions.reshape(n, window, n, window).transpose(0, 2, 1, 3).reshape(n * n, window * window)
    mask = np.where(windows[:, None, :] != windows[:, :, None], -100.0, 0.0).astype(np.float32)
    return mask[:, None, :, :]


def roll(g: GraphBuilder, x: str, name: str, shift: int, size: int) -> str:
    """Cyclic shift of an [N, H, W, C] map by `shift` along H and W (like torch.roll)."""
    cut = size - shift % size
    for axis in (1, 2):
        moved = g.slice(x, f"{name}.h{axis}", cut, size, axis)
        rest = g.slice(x, f"{name}.t{axis}", 0, cut, axis)
        x = g.op("Concat", [moved, rest], f"{name}.a{axis}" if axis == 1 else name, axis=axis)
    return x


def window_attention(
    g: GraphBuilder, x: str, name: str, dim: int, heads: int, window: int, size: int, shift: int
) -> str:
    """(Shifted) window multi-head self-attention with relative position bias on [N, H, W, C]."""
    n_win = size // window
    tokens = window * window
    head_dim = dim // heads
    if shift:
        x = roll(g, x, f"{name}.shift", -shift, size)
    # Window partition: [N, H, W, C] -> [N·nW, window², C].
    t = g.reshape(x, f"{name}.part.split", [-1, n_win, window, n_win, window, dim])
    t = g.op("Transpose", [t], f"{name}.part.perm", perm=[0, 1, 3, 2, 4, 5])
    t = g.reshape(t, f"{name}.part", [-1, tokens, dim])

    qkv = g.linear(t, f"{name}.qkv", dim, 3 * dim)
    qkv = g.reshape(qkv, f"{name}.qkv.split", [-1, tokens, 3, heads, head_dim])
    qkv = g.op("Transpose", [qkv], f"{name}.qkv.perm", perm=[2, 0, 3, 1, 4])
    q = g.op("Gather", [qkv, g.const(f"{name}.idx_q", np.asarray(0, np.int64))], f"{name}.q", axis=0)
    k = g.op("Gather", [qkv, g.const(f"{name}.idx_k", np.asarray(1, np.int64))], f"{name}.k", axis=0)
    v = g.op("Gather", [qkv, g.const(f"{name}.idx_v", np.asarray(2, np.int64))], f"{name}.v", axis=0)
    q = g.op("Mul", [q, g.scalar(f"{name}.scale", head_dim**-0.5)], f"{name}.q_scaled")
    kt = g.op("Transpose", [k], f"{name}.kt", perm=[0, 1, 3, 2])
    attn = g.op("MatMul", [q, kt], f"{name}.logits")

    table = g.normal(f"{name}.relative_position_bias_table", ((2 * window - 1) ** 2, heads), 0.02)
    index = g.const(f"{name}.relative_position_index", relative_position_index(window).reshape(-1))
    bias = g.op("Gather", [table, index], f"{name}.rpb.flat", axis=0)
    bias = g.reshape(bias, f"{name}.rpb.grid", [tokens, tokens, heads])
    bias = g.op("Transpose", [bias], f"{name}.rpb", perm=[2, 0, 1])
    attn = g.op("Add", [attn, bias], f"{name}.logits_rpb")
    if shift:
        mask = g.const(f"{name}.mask", shifted_window_mask(size, window, shift))
        attn = g.reshape(attn, f"{name}.logits_win", [-1, n_win * n_win, heads, tokens, tokens])
        attn = g.op("Add", [attn, mask], f"{name}.logits_masked")
        attn = g.reshape(attn, f"{name}.logits_flat", [-1, heads, tokens, tokens])
    attn = g.op("Softmax", [attn], f"{name}.probs", axis=-1)
    out = g.op("MatMul", [attn, v], f"{name}.ctx")
    out = g.op("Transpose", [out], f"{name}.ctx.perm", perm=[0, 2, 1, 3])
    out = g.reshape(out, f"{name}.ctx.merge", [-1, tokens, dim])
    out = g.linear(out, f"{name}.proj", dim, dim)

    # Window reverse: [N·nW, window², C] -> [N, H, W, C].
    out = g.reshape(out, f"{name}.rev.split", [-1, n_win, n_win, window, window, dim])
    out = g.op("Transpose", [out], f"{name}.rev.perm", perm=[0, 1, 3, 2, 4, 5])
    out = g.reshape(out, f"{name}.rev" if shift else name, [-1, size, size, dim])
    if shift:
        out = roll(g, out, name, shift, size)
    return out


def swin_block(
    g: GraphBuilder, x: str, name: str, dim: int, heads: int, p: Preset, size: int, shift: int
) -> str:
    """Pre-norm Swin block: x + W-MSA(LN(x)), then x + MLP(LN(x))."""
    h = g.layer_norm(x, f"{name}.norm1", dim)
    h = window_attention(g, h, f"{name}.attn", dim, heads, p.window, size, shift)
    x = g.op("Add", [x, h], f"{name}.res1")
    h = g.layer_norm(x, f"{name}.norm2", dim)
    h = g.linear(h, f"{name}.mlp.fc1", dim, p.mlp_ratio * dim)
    h = g.gelu(h, f"{name}.mlp.act")
    h = g.linear(h, f"{name}.mlp.fc2", p.mlp_ratio * dim, dim)
    return g.op("Add", [x, h], f"{name}.res2")


def patch_merging(g: GraphBuilder, x: str, name: str, dim: int, size: int) -> str:
    """Concatenate each 2×2 neighbourhood (Swin order x00, x10, x01, x11), LayerNorm, linear 4C→2C."""
    half = size // 2
    t = g.reshape(x, f"{name}.split", [-1, half, 2, half, 2, dim])
    t = g.op("Transpose", [t], f"{name}.perm", perm=[0, 1, 3, 4, 2, 5])
    t = g.reshape(t, f"{name}.concat", [-1, half, half, 4 * dim])
    t = g.layer_norm(t, f"{name}.norm", 4 * dim)
    return g.linear(t, f"{name}.reduction", 4 * dim, 2 * dim, bias=False)


def build_backbone(g: GraphBuilder, p: Preset, pixels: str, wanted: tuple[str, ...]) -> dict[str, str]:
    """Swin backbone on [N, 3, 224, 224]; returns the requested stage maps (NCHW) by name."""
    channels = p.stage_channels()
    size = INPUT_SIZE // 4
    x = g.conv(pixels, "backbone.patch_embed.proj", 3, p.embed_dim, 4, stride=4)
    x = g.op("Transpose", [x], "backbone.patch_embed.nhwc", perm=[0, 2, 3, 1])
    x = g.layer_norm(x, "backbone.patch_embed.norm", p.embed_dim)
    outputs = {}
    for i, (depth, heads, dim) in enumerate(zip(p.depths, p.num_heads, channels, strict=True)):
        if i > 0:
            x = patch_merging(g, x, f"backbone.layers.{i - 1}.downsample", channels[i - 1], size)
            size //= 2
        # Swin disables the shift when one window covers the whole map.
        shift = p.window // 2 if size > p.window else 0
        for j in range(depth):
            x = swin_block(
                g, x, f"backbone.layers.{i}.blocks.{j}", dim, heads, p, size, shift if j % 2 else 0
            )
        stage = STAGE_NAMES[i]
        if stage in wanted:
            out = g.layer_norm(x, f"backbone.norm{i}", dim)
            outputs[stage] = g.op("Transpose", [out], stage, perm=[0, 3, 1, 2])
    return outputs


# Heads --------------------------------------------------------------------------------------------


def fpn(g: GraphBuilder, name: str, feats: list[str], channels: list[int], width: int) -> list[str]:
    """Feature pyramid: 1×1 laterals, top-down nearest ×2 upsampling + add, 3×3 output convs.

    Returns P2..P5 (strides 4..32), `width` channels each.
    """
    laterals = [
        g.conv(f, f"{name}.lateral{i}", c, width, 1)
        for i, (f, c) in enumerate(zip(feats, channels, strict=True))
    ]
    merged = [laterals[-1]]
    for i in range(len(laterals) - 2, -1, -1):
        up = g.upsample(merged[0], f"{name}.up{i}", 2, "nearest")
        merged.insert(0, g.op("Add", [laterals[i], up], f"{name}.merge{i}"))
    return [g.conv(m, f"{name}.out{i}", width, width, 3) for i, m in enumerate(merged)]


def build_detection_head(g: GraphBuilder, p: Preset, feats: dict[str, str]) -> None:
    """Anchor-free dense detector with mask prototypes on a light FPN.

    A tower (3×3 conv, ReLU, channel LayerNorm) shared by P3..P5 feeds shared 1×1 predictors: class
    logits, ltrb distances (softplus, stride units) and mask coefficients.  The class logits come
    from normalised features through fan-in scaled weights, so they are roughly N(0, 1); their bias,
    DETECTION_SIGMA below logit(score_threshold), leaves only the far tail above the threshold.
    Prototypes are predicted from P2 (stride 4).  Levels are flattened row-major and concatenated
    in stride order, which is the contract's anchor order.
    """
    w = p.neck_width
    pyramid = fpn(g, "detection.fpn", [feats[s] for s in STAGE_NAMES], p.stage_channels(), w)
    tower = g.conv_params("detection.tower", w, w, 3)
    cls_bias = math.log(0.3 / 0.7) - DETECTION_SIGMA
    outputs = {  # key: (channels, bias)
        "scores": (NUM_COCO_CLASSES, cls_bias),
        "boxes": (4, BOX_BIAS),
        "mask_coeffs": (NUM_MASK_PROTOS, 0.0),
    }
    predictors = {key: g.conv_params(f"detection.{key}_pred", w, c, 1, b) for key, (c, b) in outputs.items()}
    flat: dict[str, list[str]] = {key: [] for key in outputs}
    for fmap, stride in zip(pyramid[1:], DETECTION_STRIDES, strict=True):
        name = f"detection.p{stride}"
        t = g.conv_apply(fmap, tower, 3, f"{name}.tower")
        t = g.op("Relu", [t], f"{name}.tower.relu")
        t = g.channel_norm(t, f"{name}.tower.norm", w)
        cells = (INPUT_SIZE // stride) ** 2
        for key, (channels, _) in outputs.items():
            pred = g.conv_apply(t, predictors[key], 1, f"{name}.{key}")
            flat[key].append(g.reshape(pred, f"{name}.{key}.flat", [-1, channels, cells]))
    activations = {"scores": "Sigmoid", "boxes": "Softplus", "mask_coeffs": None}
    for key, activation in activations.items():
        t = g.op("Concat", flat[key], f"detection.{key}.concat", axis=2)
        t = g.op("Transpose", [t], f"detection.{key}.raw" if activation else key, perm=[0, 2, 1])
        if activation:
            g.op(activation, [t], key)
    protos = g.conv(pyramid[0], "detection.proto.conv", w, w, 3)
    protos = g.op("Relu", [protos], "detection.proto.relu")
    g.conv(protos, "detection.proto.out", w, NUM_MASK_PROTOS, 1, output="mask_protos")


def build_segmentation_head(g: GraphBuilder, p: Preset, feats: dict[str, str]) -> None:
    """All-MLP head in the style of SegFormer's decoder: the four maps projected by 1×1 convs,
    upsampled to stride 4, concatenated, fused by a 1×1 conv and classified by another.

    Every conv is 1×1, so the head stays light next to the backbone: on `swin-t` (224×224 input)
    about 0.34 G multiply-adds against the backbone's ~4.5 G, where a 3×3 fuse over the
    concatenated maps alone would cost 1.85 G. The fused features are normalised before the 1×1
    classifier, so each class logit is roughly
    N(0, 1); a frequency-like class prior (see SEGMENTATION_PRIOR; ADE20K lists its classes roughly
    by frequency) lets a handful of classes win on a natural image.
    """
    w = p.neck_width
    branches = []
    for i, (stage, channels) in enumerate(zip(STAGE_NAMES, p.stage_channels(), strict=True)):
        t = g.conv(feats[stage], f"segmentation.lateral{i}", channels, w, 1)
        if i > 0:
            t = g.upsample(t, f"segmentation.up{i}", 2**i, "linear")
        branches.append(t)
    t = g.op("Concat", branches, "segmentation.concat", axis=1)
    t = g.conv(t, "segmentation.fuse", len(branches) * w, w, 1)
    t = g.op("Relu", [t], "segmentation.fuse.relu")
    t = g.channel_norm(t, "segmentation.fuse.norm", w)
    prior = -SEGMENTATION_PRIOR * np.log1p(np.arange(NUM_ADE_CLASSES, dtype=np.float32))
    classifier = g.conv_params("segmentation.cls", w, NUM_ADE_CLASSES, 1, prior)
    g.conv_apply(t, classifier, 1, "logits")


def build_action_head(g: GraphBuilder, p: Preset, feats: dict[str, str]) -> None:
    """Temporal attention pooling over per-frame stage4 features [T, C, 7, 7] → logits [1, 400]."""
    c = p.stage_channels()[-1]
    x = g.op("ReduceMean", [feats["stage4"]], "action.pool", axes=[2, 3], keepdims=0)
    score = g.linear(x, "action.attn", c, 1)
    weight = g.op("Softmax", [score], "action.attn.softmax", axis=0)
    t = g.op("Mul", [x, weight], "action.weighted")
    t = g.op("ReduceSum", [t, g.ints("action.time_axis", [0])], "action.clip", keepdims=1)
    t = g.layer_norm(t, "action.norm", c)
    g.linear(t, "action.fc", c, NUM_KINETICS_CLASSES, output="logits")


# Model set ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSpec:
    """One head of the set: how to build it and how the manifest describes it."""

    name: str
    kind: str
    labels: str
    inputs: tuple[str, ...]
    build: Callable[[GraphBuilder, Preset, dict[str, str]], None]
    outputs: dict[str, list]
    params: dict[str, object]
    batch_dim: str = "N"


def head_specs(p: Preset) -> list[HeadSpec]:
    """The three demo heads for preset `p`."""
    anchors = sum((INPUT_SIZE // s) ** 2 for s in DETECTION_STRIDES)
    proto = INPUT_SIZE // PROTO_STRIDE
    return [
        HeadSpec(
            name="detection",
            kind="detection",
            labels="coco80.txt",
            inputs=STAGE_NAMES,
            build=build_detection_head,
            outputs={
                "scores": ["N", anchors, NUM_COCO_CLASSES],
                "boxes": ["N", anchors, 4],
                "mask_coeffs": ["N", anchors, NUM_MASK_PROTOS],
                "mask_protos": ["N", NUM_MASK_PROTOS, proto, proto],
            },
            params={
                "strides": list(DETECTION_STRIDES),
                "proto_stride": PROTO_STRIDE,
                "score_threshold": 0.3,
                "iou_threshold": 0.5,
                "max_detections": 100,
                "mask_threshold": 0.5,
                "pre_nms_top_k": 1000,
            },
        ),
        HeadSpec(
            name="segmentation",
            kind="segmentation",
            labels="ade20k150.txt",
            inputs=STAGE_NAMES,
            build=build_segmentation_head,
            outputs={"logits": ["N", NUM_ADE_CLASSES, INPUT_SIZE // 4, INPUT_SIZE // 4]},
            params={"output_stride": 4},
        ),
        HeadSpec(
            name="action",
            kind="action",
            labels="kinetics400.txt",
            inputs=("stage4",),
            build=build_action_head,
            outputs={"logits": [1, NUM_KINETICS_CLASSES]},
            params={"frames": p.frames, "max_frames": MAX_FRAMES},
            batch_dim="T",
        ),
    ]


def stage_shapes(p: Preset, batch_dim: str) -> dict[str, list]:
    """Shapes of the backbone outputs, [batch, C, H/s, W/s]."""
    return {
        stage: [batch_dim, c, INPUT_SIZE // s, INPUT_SIZE // s]
        for stage, c, s in zip(STAGE_NAMES, p.stage_channels(), STAGE_STRIDES, strict=True)
    }


def pixel_input(batch_dim: str) -> onnx.ValueInfoProto:
    """The backbone input, [batch, 3, 224, 224]."""
    return tensor("pixel_values", [batch_dim, 3, INPUT_SIZE, INPUT_SIZE])


def backbone_model(p: Preset, seed: int) -> onnx.ModelProto:
    """The standalone backbone: pixel_values → stage1..stage4."""
    g = GraphBuilder(seed)
    build_backbone(g, p, "pixel_values", STAGE_NAMES)
    shapes = stage_shapes(p, "N")
    return g.model("backbone", [pixel_input("N")], [tensor(s, shapes[s]) for s in STAGE_NAMES])


def head_model(p: Preset, seed: int, spec: HeadSpec) -> onnx.ModelProto:
    """A standalone head, fed the backbone outputs it names."""
    g = GraphBuilder(seed)
    spec.build(g, p, {s: s for s in spec.inputs})
    shapes = stage_shapes(p, spec.batch_dim)
    inputs = [tensor(s, shapes[s]) for s in spec.inputs]
    outputs = [tensor(name, shape) for name, shape in spec.outputs.items()]
    return g.model(f"{spec.name}_head", inputs, outputs)


def reference_model(p: Preset, seed: int, spec: HeadSpec) -> onnx.ModelProto:
    """Backbone and head fused into one graph with the same weights: pixel_values → head outputs."""
    g = GraphBuilder(seed)
    feats = build_backbone(g, p, "pixel_values", spec.inputs)
    spec.build(g, p, feats)
    outputs = [tensor(name, shape) for name, shape in spec.outputs.items()]
    return g.model(f"reference_{spec.name}", [pixel_input(spec.batch_dim)], outputs)


def toml_value(value: object) -> str:
    """Format a manifest value (str, bool, int, float or a list of those) as TOML."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def toml_table(header: str | None, entries: dict[str, object]) -> str:
    """One TOML table (or the root table when `header` is None)."""
    lines = [header] if header else []
    lines += [f"{key} = {toml_value(value)}" for key, value in entries.items()]
    return "\n".join(lines) + "\n"


def manifest(preset_name: str, p: Preset, heads: list[HeadSpec]) -> str:
    """The polyhead.toml text of the set."""
    parts = [
        toml_table(None, {"name": f"demo-{preset_name}", "version": "1"}),
        toml_table(
            "[backbone]",
            {
                "name": "backbone",
                "file": "backbone.onnx",
                "input": "pixel_values",
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
                "resize": "letterbox",
                "input_size": [INPUT_SIZE, INPUT_SIZE],
                "pad_value": 114,
            },
        ),
    ]
    for stage, c, s in zip(STAGE_NAMES, p.stage_channels(), STAGE_STRIDES, strict=True):
        parts.append(toml_table("[[backbone.outputs]]", {"name": stage, "channels": c, "stride": s}))
    for spec in heads:
        parts.append(
            toml_table(
                "[[heads]]",
                {
                    "name": spec.name,
                    "kind": spec.kind,
                    "file": f"{spec.name}_head.onnx",
                    "inputs": list(spec.inputs),
                    "labels": spec.labels,
                    "version": "1",
                },
            )
            + toml_table("[heads.params]", spec.params)
        )
    return "\n".join(parts)


def fix_axes(model: onnx.ModelProto, sizes: dict[str, int]) -> onnx.ModelProto:
    """Declare the named dynamic axes of the model's inputs and outputs with fixed sizes."""
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]
    return model


def build_set(preset_name: str, out: Path, seed: int, fixed: dict[str, int] | None = None) -> None:
    """Write the manifest, the ONNX files and the label files of one preset into `out`.

    `fixed` declares dynamic axes ("N": the batch, "T": the action head's frames) with a fixed
    size, as an export without dynamic axes gives them."""
    p = PRESETS[preset_name]
    heads = head_specs(p)
    out.mkdir(parents=True, exist_ok=True)

    def save(model: onnx.ModelProto, name: str) -> None:
        onnx.save_model(fix_axes(model, fixed or {}), out / name)

    save(backbone_model(p, seed), "backbone.onnx")
    for spec in heads:
        save(head_model(p, seed, spec), f"{spec.name}_head.onnx")
        save(reference_model(p, seed, spec), f"reference_{spec.name}.onnx")
        shutil.copyfile(LABELS_DIR / spec.labels, out / spec.labels)
    (out / "polyhead.toml").write_text(manifest(preset_name, p, heads))


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model set into")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--fixed-batch",
        type=int,
        metavar="N",
        help="declare the batch axis with size N instead of dynamic, as an export without dynamic axes",
    )
    parser.add_argument(
        "--fixed-frames",
        action="store_true",
        help="declare the action head's frame axis with the preset's frames instead of dynamic",
    )
    args = parser.parse_args()
    fixed = {"N": args.fixed_batch} if args.fixed_batch else {}
    if args.fixed_frames:
        fixed["T"] = PRESETS[args.preset].frames
    build_set(args.preset, args.out, args.seed, fixed)


if __name__ == "__main__":
    main()
