"""The optional onnxruntime engine: the zoo's own forward as an ONNX graph, run on CPU.

Why. On this project's CPUs XLA lowers every convolution to YNNPACK (jaxlib 0.10.2) and leaves
bias + ReLU + residual add as separate memory-bound loops; onnxruntime's MLAS runs the same
convolutions in its blocked NCHWc layout with bias, ReLU and the residual add fused into the
convolution, and measures well ahead on the same network and threads (figures and commands in
docs/extraction.md). So on CPU the forward can run here instead; on GPU and TPU the JAX path stays.

What. :func:`build_graph` writes the inference network of one model straight from its
``(ResNetConfig, canonical state dict)`` (the contract in :mod:`ddscore_jax.model`): BatchNorm is
folded by :func:`ddscore_jax.model.fold`, the very weights the JAX forward runs, so the two agree
to float32 rounding (tests/test_engine.py). The graph takes the engine's NHWC images, transposes
them once, stops after the last conv4_x block asked for (or runs ``layer4`` + ``fc`` when a head
is asked for), and returns each block's spatial mean, as the JAX forward does.

onnx and onnxruntime are an optional extra (``pip install ddscore-jax[cpu]``); without them the
JAX path runs, and :func:`available` says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache

import numpy as np

from ddscore_jax import model, settings
from ddscore_jax.model import FEATURE_STAGE, ResNetConfig, StateDict

ENGINES = settings.ENGINES
OPSET = 17
# onnxruntime reads every IR version up to its own; 8 is what opset 17 was released with.
IR_VERSION = 8


def available() -> bool:
    """Whether onnx and onnxruntime are installed (the ``cpu`` extra)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def default_engine(backend: str, dtype: str = "float32", devices: int = 1) -> str:
    """``"onnxruntime"`` for a float32 forward on a single CPU device when it is installed, else
    ``"jax"``.

    bfloat16 stays on JAX (the ONNX graph is float32), and so does a mesh of several devices or
    hosts (the JAX engine shards each batch over it; this one runs on the local CPU only).
    """
    if backend == "cpu" and dtype == "float32" and devices == 1 and available():
        return "onnxruntime"
    return "jax"


def resolve(engine: str, backend: str, dtype: str = "float32", devices: int = 1) -> str:
    """``--engine`` (auto, jax, onnxruntime) -> the engine that runs; InputError if it cannot.

    ``devices``: the size of the mesh the forward would run on (every device of every host).
    """
    from ddscore_jax.errors import InputError

    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        return default_engine(backend, dtype, devices)
    if engine == "onnxruntime":
        if not available():
            raise InputError("--engine onnxruntime needs onnx and onnxruntime: "
                             "pip install 'ddscore-jax[cpu]'")
        if dtype != "float32":
            raise InputError(f"--engine onnxruntime runs float32 only, not --dtype {dtype}")
        if devices > 1:
            raise InputError(f"--engine onnxruntime runs on one device; this run has {devices} "
                             "(use --engine jax)")
    return engine


class _Graph:
    """Accumulates ONNX nodes and initialisers under unique names."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.inits: list = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}#{self.count}"

    def op(self, op_type: str, inputs: Sequence[str], hint: str, output: str | None = None,
           **attrs) -> str:
        out = output or self.name(hint)
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(value, np.float32),
                                                       name))
        return name

    def conv(self, x: str, sd: StateDict, key: str, stride: int = 1, groups: int = 1,
             relu: bool = False) -> str:
        w = sd[f"{key}.weight"]
        k = w.shape[-1]
        y = self.op("Conv", [x, self.const(f"{key}.weight", w), self.const(f"{key}.bias",
                                                                           sd[f"{key}.bias"])],
                    key, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4,
                    group=groups)
        return self.op("Relu", [y], key + ".relu") if relu else y


def _block(g: _Graph, x: str, sd: StateDict, key: str, config: ResNetConfig, stride: int,
           has_downsample: bool) -> str:
    if config.block == "basic":
        y = g.conv(x, sd, f"{key}.conv1", stride, relu=True)
        y = g.conv(y, sd, f"{key}.conv2")
    else:
        y = g.conv(x, sd, f"{key}.conv1", relu=True)
        y = g.conv(y, sd, f"{key}.conv2", stride, groups=config.groups, relu=True)
        y = g.conv(y, sd, f"{key}.conv3")
    shortcut = x
    if has_downsample:
        if config.avg_down:
            # timm's AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False), then a 1x1.
            pooled = x if stride == 1 else g.op(
                "AveragePool", [x], f"{key}.downsample.0", kernel_shape=[2, 2],
                strides=[2, 2], ceil_mode=1, count_include_pad=0)
            shortcut = g.conv(pooled, sd, f"{key}.downsample.1")
        else:
            shortcut = g.conv(x, sd, f"{key}.downsample.0", stride)
    return g.op("Relu", [g.op("Add", [y, shortcut], f"{key}.add")], f"{key}.out")


def _pooled(g: _Graph, x: str, output: str) -> str:
    return g.op("Flatten", [g.op("GlobalAveragePool", [x], output + ".pool")], output,
                output=output, axis=1)


def build_graph(config: ResNetConfig, state_dict: StateDict, blocks: int = 2,
                head: str | None = None):
    """The inference network of one model as an ``onnx.ModelProto``.

    Input ``images`` (N, H, W, 3) float32, ImageNet-normalised (what the engine decodes).
    Outputs ``layer3.0`` .. ``layer3.{blocks-1}`` (N, d) and, with ``head`` ("logits" or
    "probabilities"), that output (N, num_classes) of ``layer4`` + ``fc`` (+ softmax).
    """
    from onnx import TensorProto, helper

    if head is not None and head not in ("logits", "probabilities"):
        raise ValueError(f"unknown head {head!r}")
    if head is not None and not config.num_classes:
        raise ValueError(f"{config.name} has no classifier (fc)")
    if not 0 <= blocks <= config.depths[2] or (blocks == 0 and head is None):
        raise ValueError(f"blocks {blocks} not in 1..{config.depths[2]} (or 0 with a head)")
    if head is None and (config.depths[3] or config.num_classes):
        config = config.backbone()
        state_dict = {k: v for k, v in state_dict.items()
                      if not k.startswith(("layer4.", "fc."))}
    config, sd = model.fold(config, state_dict)

    g = _Graph()
    x = g.op("Transpose", ["images"], "nchw", perm=[0, 3, 1, 2])
    if config.deep_stem:
        x = g.conv(x, sd, "conv1.0", 2, relu=True)
        x = g.conv(x, sd, "conv1.3", relu=True)
        x = g.conv(x, sd, "conv1.6", relu=True)
    else:
        x = g.conv(x, sd, "conv1", 2, relu=True)
    x = g.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)

    outputs = [f"{FEATURE_STAGE}.{i}" for i in range(blocks)]
    cin = 64
    last_stage = 4 if head is not None else 3
    for stage in range(last_stage):
        planes = 64 * 2 ** stage
        cout = planes * config.expansion
        depth = config.depths[stage]
        if stage == 2 and head is None:
            depth = blocks
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            key = f"layer{stage + 1}.{i}"
            x = _block(g, x, sd, key, config, stride, stride != 1 or cin != cout)
            cin = cout
            if stage == 2 and i < blocks:
                _pooled(g, x, outputs[i])
    if head is not None:
        pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x], "head.pool")], "head.flat",
                      axis=1)
        logits = g.op("Gemm", [pooled, g.const("fc.weight", sd["fc.weight"]),
                               g.const("fc.bias", sd["fc.bias"])], "fc", transB=1,
                      output="logits" if head == "logits" else None)
        if head == "probabilities":
            g.op("Softmax", [logits], "softmax", output="probabilities", axis=-1)
        outputs.append(head)

    width = {f"{FEATURE_STAGE}.{i}": config.feature_dim for i in range(blocks)}
    width[head] = config.num_classes
    graph = helper.make_graph(
        g.nodes, config.name,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", width[o]]) for o in outputs],
        initializer=g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="ddscore-jax")
    proto.ir_version = IR_VERSION
    return proto


def default_threads() -> int:
    """The CPUs this process may run on (not the machine's count under a CPU mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@cache
def _shared_arena() -> None:
    """Register one CPU arena for every session of this process (once).

    Each session would otherwise keep its own arena at its peak activation size, ~300 MiB per
    ResNet18 at batch 32 x 224 px, so a zoo of ten would hold ten of them; models run one after
    the other, so one arena serves them all (measured in docs/extraction.md).
    """
    import onnxruntime as ort

    ort.create_and_register_allocator(
        ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                          ort.OrtMemType.DEFAULT), None)


def session(proto, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` for ``proto`` on the CPU, all graph optimisations on.

    Its intra-op pool does not spin between operators: on a small shared CPU a spinning pool
    takes the cores the decode threads need (measured in docs/extraction.md). Activations live in
    one arena shared by every session of the process.
    """
    import onnxruntime as ort

    _shared_arena()
    so = ort.SessionOptions()
    so.add_session_config_entry("session.use_env_allocators", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: its warnings would land in the user's terminal
    return ort.InferenceSession(proto.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


class OrtModel:
    """One model's inference network in onnxruntime: ``images`` NHWC -> ``{output: (N, w)}``."""

    def __init__(self, config: ResNetConfig, state_dict: StateDict, blocks: int = 2,
                 head: str | None = None, threads: int | None = None):
        proto = build_graph(config, state_dict, blocks, head)
        self.outputs = [o.name for o in proto.graph.output]
        self.session = session(proto, threads)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(images, np.float32)
        return dict(zip(self.outputs, self.session.run(self.outputs, {"images": x}),
                        strict=True))

