"""ONNX graphs of the ResNet v1 family -> :class:`ResNetConfig` + the canonical state dict.

Exporters name nodes and initializers as they please, so nothing here reads a name: the importer
folds constant subgraphs, then walks the graph from its input (stem, residual blocks, pooled linear
head), matches each piece by operator, attributes and which tensors are constant, and gives the
parameters timm's/torchvision's module names by position. What the walk finds (BasicBlock or
Bottleneck, blocks per stage, groups, widths, deep stem, average-pool shortcut) is the config.

A graph that keeps its BatchNormalization nodes (exported without constant folding) gives the
BatchNorm parameters and its epsilon; a graph whose exporter folded BatchNorm into the convolutions
gives the convolutions' weights and biases and ``batchnorm=False``. The model folds the former
itself (see ``ddscore_jax.model``).

onnx is imported here and nowhere else (it is the ``onnx`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddscore_jax import model
from ddscore_jax.converters._common import first_line
from ddscore_jax.errors import InputError
from ddscore_jax.model import ImportedModel, ResNetConfig

_DEFAULT_DOMAINS = ("", "ai.onnx")
# Operators folded when all their inputs are constant: the plumbing exporters put around weights
# (dynamo with optimize=False builds conv biases from Shape/Expand/CastLike). An allowlist, so that
# nothing random (RandomNormal) or expensive is ever "folded".
_FOLDABLE = frozenset({
    "Identity", "Constant", "ConstantOfShape", "Shape", "Size", "Expand", "Cast", "CastLike",
    "Reshape", "Concat", "Unsqueeze", "Squeeze", "Flatten", "Gather", "Slice", "Transpose", "Tile",
    "Range", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Pow", "Equal", "Where",
})
# Nodes that pass a tensor through unchanged in an inference graph.
_PASS_THROUGH = frozenset({"Identity", "Dropout"})
# Between the pooling and the classifier: shape-only operators.
_METADATA_ONLY = frozenset({"Shape", "Size"})
_HEAD_RESHAPES = frozenset({"Flatten", "Reshape", "Squeeze"})
_BN_EPS_DEFAULT = 1e-5  # the ONNX default of BatchNormalization's epsilon attribute
_STAGES = 4
_STAGE_WIDTHS = (64, 128, 256, 512)  # planes per stage in every ResNet v1 (timm and torchvision)
_EXPANSION = {"basic": 1, "bottleneck": 4}
_NOT_V1 = "only the ResNet v1 family (torchvision/timm ResNet, ResNeXt, Wide ResNet, ResNet-D)"


def load_onnx(path: Path) -> ImportedModel:
    """Read an ONNX ResNet v1 graph into :class:`ImportedModel` (config + canonical state dict),
    every key and shape checked against the config."""
    config, state_dict = read_onnx(path)
    try:
        model.check_state_dict(state_dict, config)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
    return ImportedModel(config=config, state_dict=state_dict)


def read_onnx(path: Path) -> tuple[ResNetConfig, dict[str, np.ndarray]]:
    """``(config, state_dict)`` of an ONNX ResNet v1 graph: the state dict under timm's names, in
    torch layouts (conv OIHW, ``fc.weight`` (out, in)), float32.

    External weights are read only from inside the model's folder. Raises InputError naming
    ``path`` for anything that is not such a graph.
    """
    try:
        import onnx
    except ImportError:
        raise InputError(f"{path}: importing ONNX models needs onnx: "
                         "pip install 'ddscore-jax[onnx]'") from None
    source = str(path)
    proto = _read_model(onnx, Path(path), source)
    graph = _Graph(onnx, proto, Path(path), source)
    return _Walker(graph, source).walk()


def _read_model(onnx, path: Path, source: str):
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise InputError(f"{source}: not an ONNX model ({first_line(e)})") from None
    # Protobuf parses many non-ONNX byte strings (an empty file among them) without complaint.
    if not proto.graph.node or not proto.opset_import:
        raise InputError(f"{source}: not an ONNX model (no graph nodes or no opset)")
    if proto.functions:
        import onnx.inliner

        try:
            proto = onnx.inliner.inline_local_functions(proto)
        except Exception as e:  # noqa: BLE001 - the inliner reports bad functions in many ways
            raise InputError(f"{source}: cannot inline the model's local functions "
                             f"({first_line(e)})") from None
    return proto


@dataclass
class _Node:
    op: str
    inputs: list[str]  # canonical tensor names; "" for an omitted optional input
    outputs: list[str]
    attrs: dict[str, Any]


class _Graph:
    """The model's constants (folded) and its remaining nodes, with pass-through nodes removed."""

    def __init__(self, onnx, proto, path: Path, source: str):
        self.source = source
        self.opset = next((o.version for o in proto.opset_import if o.domain in _DEFAULT_DOMAINS),
                          None)
        if self.opset is None:
            raise InputError(f"{source}: the model imports no standard ONNX opset")
        g = proto.graph
        self.consts: dict[str, np.ndarray] = {}
        for t in g.initializer:
            self.consts[t.name] = _tensor_to_array(onnx, t, path, source)
        if g.sparse_initializer:
            raise InputError(f"{source}: sparse initializers are not supported")
        self._proto = proto
        self._elem_types: dict[str, int] | None = None  # shape inference, run only when needed
        self.inputs = [i.name for i in g.input if i.name not in self.consts]
        # Declared input shapes, a dimension None where it is symbolic: tells NHWC from NCHW.
        self.input_shapes = {
            i.name: [d.dim_value if d.HasField("dim_value") else None
                     for d in i.type.tensor_type.shape.dim]
            for i in g.input if i.type.HasField("tensor_type")}
        nodes = list(g.node)
        self._fold(onnx, nodes)
        # Tensors that a pass-through node merely renames are replaced by their source, so the
        # walk sees Conv -> Relu even when an exporter put Identity in between.
        self._alias: dict[str, str] = {}
        self.nodes: list[_Node] = []
        for n in nodes:
            if n.output and all(o in self.consts for o in n.output if o):
                continue
            if n.domain not in _DEFAULT_DOMAINS:
                self.nodes.append(_Node(f"{n.domain}.{n.op_type}", list(n.input),
                                        list(n.output), {}))
                continue
            inputs = [self.canon(i) for i in n.input]
            if n.op_type in _PASS_THROUGH and inputs and inputs[0] not in self.consts:
                self._alias[n.output[0]] = inputs[0]
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            self.nodes.append(_Node(n.op_type, inputs, list(n.output), attrs))
        self._consumers: dict[str, list[_Node]] = {}
        self._producer = {o: n for n in self.nodes for o in n.outputs if o}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    self._consumers.setdefault(i, []).append(n)

    def canon(self, name: str) -> str:
        while name in self._alias:
            name = self._alias[name]
        return name

    def consumers(self, tensor: str) -> list[_Node]:
        """The nodes that read ``tensor``'s values; Shape/Size read only its metadata."""
        return [n for n in self._consumers.get(self.canon(tensor), [])
                if n.op not in _METADATA_ONLY]

    def normalises_non_conv_outputs(self) -> bool:
        """True when some BatchNormalization reads a tensor no Conv wrote: the mark of a
        pre-activation ResNet (BN -> ReLU -> Conv), where torchvision's v1 has Conv -> BN."""
        for n in self.nodes:
            if n.op == "BatchNormalization":
                producer = self._producer.get(n.inputs[0])
                if producer is None or producer.op != "Conv":
                    return True
        return False

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(self.canon(name)) if name else None

    def _fold(self, onnx, nodes) -> None:
        # ONNX requires nodes in topological order, but not every writer obeys; repeat until stable.
        changed = True
        while changed:
            changed = False
            for n in nodes:
                if (n.domain not in _DEFAULT_DOMAINS or n.op_type not in _FOLDABLE
                        or not n.output or all(o in self.consts for o in n.output if o)):
                    continue
                values = self._fold_node(onnx, n)
                if values is not None:
                    self.consts.update({o: v for o, v in zip(n.output, values, strict=True) if o})
                    changed = True

    def _fold_node(self, onnx, n) -> list[np.ndarray] | None:
        present = [i for i in n.input if i]
        if n.op_type == "Identity":
            return [self.consts[n.input[0]]] if n.input[0] in self.consts else None
        if n.op_type == "CastLike" and n.input[0] in self.consts:
            # Only the second input's element type matters, and it is known without its values.
            if self._elem_types is None:
                self._elem_types = _elem_types(onnx, self._proto)
            target = self._elem_types.get(n.input[1])
            if target is None:
                return None
            dtype = onnx.helper.tensor_dtype_to_np_dtype(target)
            return [np.asarray(self.consts[n.input[0]]).astype(dtype)]
        if not all(i in self.consts for i in present):
            return None
        from onnx.reference import ReferenceEvaluator

        try:
            evaluator = ReferenceEvaluator(n, opsets={"": self.opset})
            feeds = {i: self.consts[i] for i in present}
            return [np.asarray(v) for v in evaluator.run(None, feeds)]
        except Exception:  # noqa: BLE001 - the reference runtime raises whatever numpy raises
            # Left unfolded: if the walk needs this value it reports it as not constant.
            return None


def _elem_types(onnx, proto) -> dict[str, int]:
    """Element type of every tensor whose type the graph declares or shape inference finds."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:  # noqa: BLE001 - a graph inference rejects may still be importable
        inferred = proto.graph
    types = {}
    for v in (*inferred.input, *inferred.value_info, *inferred.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    return types


def _tensor_to_array(onnx, tensor, path: Path, source: str) -> np.ndarray:
    from onnx import numpy_helper

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        tensor = _with_external_data(onnx, tensor, path, source)
    try:
        return numpy_helper.to_array(tensor)
    except Exception as e:  # noqa: BLE001 - malformed tensors fail inside numpy in many ways
        raise InputError(f"{source}: unreadable tensor {tensor.name!r} "
                         f"({first_line(e)})") from None


def _with_external_data(onnx, tensor, path: Path, source: str):
    """A copy of ``tensor`` with its bytes read from the external file, which must lie inside the
    model's folder (after resolving symlinks and ``..``)."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise InputError(f"{source}: tensor {tensor.name!r} is stored externally but names no file")
    folder = path.parent.resolve()
    if Path(location).is_absolute():
        raise InputError(f"{source}: external data location {location!r} is an absolute path; "
                         "only files inside the model's folder are read")
    target = (folder / location).resolve()
    if not target.is_relative_to(folder):
        raise InputError(f"{source}: external data location {location!r} escapes the model's "
                         f"folder {folder}")
    if not target.is_file():
        raise InputError(f"{source}: external data file {location!r} is missing")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InputError(f"{source}: bad offset/length for external tensor "
                         f"{tensor.name!r}") from None
    size = target.stat().st_size
    end = size if length is None else offset + length
    if offset < 0 or end > size or end < offset:
        raise InputError(f"{source}: external data file {location!r} is too short for tensor "
                         f"{tensor.name!r} (truncated?)")
    with open(target, "rb") as f:
        f.seek(offset)
        raw = f.read(end - offset)
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    del copy.external_data[:]
    copy.data_location = onnx.TensorProto.DEFAULT
    copy.raw_data = raw
    return copy


@dataclass
class _Block:
    """What one matched residual block tells about the architecture."""

    kind: str  # "basic" or "bottleneck"
    stride: int
    groups: int
    shortcut: str | None  # None (identity), "conv" (1x1 conv) or "avg" (AveragePool + 1x1 conv)
    widths: tuple[int, ...]  # output channels of each main-path convolution


class _Walker:
    """Matches the graph to the ResNet v1 layout, from the input to the classifier."""

    def __init__(self, graph: _Graph, source: str):
        self.g = graph
        self.source = source
        self.sd: dict[str, np.ndarray] = {}
        self.normalised: list[bool] = []  # per convolution: followed by a BatchNormalization node
        self.eps: set[float] = set()

    def fail(self, problem: str) -> InputError:
        return InputError(f"{self.source}: {problem}")

    def walk(self) -> tuple[ResNetConfig, dict[str, np.ndarray]]:
        if len(self.g.inputs) != 1:
            raise self.fail(f"expected one image input, found {len(self.g.inputs)} graph inputs")
        self._check_layout(self.g.inputs[0])
        try:
            return self._walk(self.g.inputs[0])
        except InputError:
            # Where the match fails in a v2 graph depends on its stem; name the real cause.
            if self.g.normalises_non_conv_outputs():
                raise self.fail("pre-activation ResNet (v2: BatchNorm and ReLU before each "
                                f"convolution) is not supported; {_NOT_V1}") from None
            raise

    def _walk(self, image: str) -> tuple[ResNetConfig, dict[str, np.ndarray]]:
        x, deep_stem, stem_width = self._stem(image)
        stage, index = 0, 0
        blocks: list[list[_Block]] = [[] for _ in range(_STAGES)]
        while any(n.op in ("Conv", "AveragePool") for n in self.g.consumers(x)):
            starts = [n for n in self.g.consumers(x) if n.op in ("Conv", "AveragePool")]
            # Only the first block of a stage has a shortcut convolution (or pooling); its later
            # blocks add their input unchanged. layer1's first block is the first block anyway.
            if len(starts) > 1 and (index or stage):
                stage, index = stage + 1, 0
            if stage >= _STAGES:
                raise self.fail(f"more than {_STAGES} residual stages: not a ResNet")
            stride = 2 if stage and not index else 1
            x, block = self._block(x, starts, f"layer{stage + 1}.{index}", stride)
            blocks[stage].append(block)
            index += 1
        if not blocks[0]:
            found = ", ".join(sorted({n.op for n in self.g.consumers(x)})) or "nothing"
            hint = " (pre-activation ResNet v2?)" if "BatchNormalization" in found else ""
            raise self.fail(f"no residual block after the stem's MaxPool: it feeds {found}{hint}; "
                            "expected a ResNet BasicBlock or Bottleneck")
        if stage + 1 < 3:
            last = f"layer{stage + 1}.{index - 1}"
            raise self.fail(f"graph ends after {last} with {stage + 1} residual stages; conv4_x "
                            "('layer3') and layer4 missing (truncated graph?)")
        num_classes = self._head(x) if stage + 1 == _STAGES else 0
        config = self._config(blocks, deep_stem, stem_width, num_classes)
        return config, self.sd

    # -- the architecture ---------------------------------------------------------------------

    def _config(self, blocks: list[list[_Block]], deep_stem: bool, stem_width: int,
                num_classes: int) -> ResNetConfig:
        every = [b for stage in blocks for b in stage]
        kinds = {b.kind for b in every}
        if len(kinds) > 1:
            raise self.fail("the graph mixes BasicBlocks and Bottlenecks: not a ResNet v1")
        kind = kinds.pop()
        groups = {b.groups for b in every}
        if len(groups) > 1:
            raise self.fail(f"grouped convolutions with different groups {sorted(groups)}")
        g = groups.pop()
        # Strided shortcuts say whether the net pools before its 1x1 conv (ResNet-D); layer1's
        # first Bottleneck has a stride-1 shortcut, a plain conv in both layouts.
        pooled = {b.shortcut == "avg" for stage in blocks[1:] for b in stage[:1]}
        if len(pooled) > 1:
            raise self.fail("some strided shortcuts average-pool before their convolution and "
                            "some do not: not a ResNet v1 layout")
        avg_down = pooled.pop()
        width1 = blocks[0][0].widths[0]
        base_width = width1 // g if kind == "bottleneck" else 64
        for s, stage in enumerate(blocks):
            for i, b in enumerate(stage):
                planes = _STAGE_WIDTHS[s]
                inner = int(planes * base_width / 64) * g
                want = (inner, inner, planes * 4) if kind == "bottleneck" else (planes, planes)
                if b.widths != want or (kind == "bottleneck" and width1 % g):
                    raise self.fail(f"layer{s + 1}.{i}: convolution widths {b.widths} differ from "
                                    f"the ResNet family's {want} (stage widths 64, 128, 256, 512)")
        if avg_down:
            self._rename_unpooled_shortcut(blocks)
        if len(set(self.normalised)) > 1:
            raise self.fail("some convolutions are followed by BatchNormalization and some have it "
                            "folded in; expected one or the other throughout")
        batchnorm = self.normalised[0]
        if len(self.eps) > 1:
            raise self.fail(f"BatchNormalization epsilons differ within the graph "
                            f"({', '.join(f'{e:g}' for e in sorted(self.eps))}); expected one")
        extra = {"bn_eps": self.eps.pop()} if batchnorm else {}
        try:
            return ResNetConfig(
                block=kind, depths=tuple(len(stage) for stage in blocks), groups=g,
                base_width=base_width, deep_stem=deep_stem, stem_width=stem_width,
                avg_down=avg_down, num_classes=num_classes, batchnorm=batchnorm, **extra)
        except ValueError as e:
            raise self.fail(f"not a supported ResNet ({e})") from None

    def _rename_unpooled_shortcut(self, blocks: list[list[_Block]]) -> None:
        """timm's average-pool shortcut is ``(pool, conv, norm)`` even where its pool is an
        Identity (stride 1, layer1's first Bottleneck): shift those keys to ``downsample.1/.2``."""
        if blocks[0][0].shortcut != "conv":
            return
        old = {"layer1.0.downsample.0.": "layer1.0.downsample.1.",
               "layer1.0.downsample.1.": "layer1.0.downsample.2."}
        renamed = {}
        for key, value in self.sd.items():
            prefix = next((p for p in old if key.startswith(p)), None)
            renamed[old[prefix] + key[len(prefix):] if prefix else key] = value
        self.sd = renamed

    # -- pieces --------------------------------------------------------------------------------

    def _check_layout(self, image: str) -> None:
        """Refuse channels-last graphs (Keras through tf2onnx): input (N, H, W, 3), transposed to
        NCHW for the first convolution."""
        shape = self.g.input_shapes.get(image) or []
        transposed = any(n.op == "Transpose" and list(n.attrs.get("perm", [])) == [0, 3, 1, 2]
                         for n in self.g.consumers(image))
        if transposed or (len(shape) == 4 and shape[3] == 3 and shape[1] != 3):
            dims = "x".join("?" if d is None else str(d) for d in shape)
            raise self.fail(f"NHWC layout (channels-last input {dims or '?'}, as Keras/tf2onnx "
                            "export it) is not supported; export the ResNet from PyTorch (NCHW)")

    def _only(self, tensor: str, op: str, after: str) -> _Node:
        nodes = self.g.consumers(tensor)
        if len(nodes) != 1 or nodes[0].op != op:
            found = ", ".join(n.op for n in nodes) or "nothing (graph output)"
            raise self.fail(f"expected {op} after {after}, found {found}")
        return nodes[0]

    def _stem(self, image: str) -> tuple[str, bool, int]:
        """Match the stem; return (its output tensor, deep stem?, deep stem's width)."""
        conv = self._only(image, "Conv", "the image input")
        if self._kernel_size(conv) == 3:
            # ResNet-D's deep stem: three 3x3 conv-BN-ReLU, the first strided (timm's names).
            names = (("conv1.0", "conv1.1", 2), ("conv1.3", "conv1.4", 1), ("conv1.6", "bn1", 1))
            widths, x = [], image
            for i, (conv_name, bn_name, stride) in enumerate(names):
                if i:
                    conv = self._only(x, "Conv", f"the ReLU after {names[i - 1][0]}")
                y = self._conv(conv, conv_name, bn_name, kernel=3, stride=stride)
                x = self._only(y, "Relu", f"the stem convolution {conv_name!r}").outputs[0]
                widths.append(self.sd[f"{conv_name}.weight"].shape[0])
            if widths[0] != widths[1] or widths[2] != _STAGE_WIDTHS[0]:
                raise self.fail(f"deep stem widths {tuple(widths)}: only (w, w, 64) (timm's "
                                "'deep' stem) is supported")
            deep, stem_width = True, widths[0]
        else:
            y = self._conv(conv, "conv1", "bn1", kernel=7, stride=2)
            x = self._only(y, "Relu", "the stem convolution 'conv1'").outputs[0]
            if self.sd["conv1.weight"].shape[0] != _STAGE_WIDTHS[0]:
                raise self.fail(f"stem convolution has {self.sd['conv1.weight'].shape[0]} "
                                "channels, not 64")
            deep, stem_width = False, 64
        pool = self._only(x, "MaxPool", "the stem's ReLU")
        a = pool.attrs
        if (list(a.get("kernel_shape", [])) != [3, 3] or list(a.get("strides", [1, 1])) != [2, 2]
                or list(a.get("pads", [0] * 4)) != [1] * 4 or a.get("ceil_mode", 0)
                or list(a.get("dilations", [1, 1])) != [1, 1]
                or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            raise self.fail(f"stem MaxPool is not torchvision's 3x3/stride 2/padding 1 ({a})")
        return pool.outputs[0], deep, stem_width

    def _block(self, x: str, starts: list[_Node], name: str, stride: int) -> tuple[str, _Block]:
        """Match one BasicBlock or Bottleneck reading tensor ``x``; return its output tensor."""
        if len(starts) > 2:
            raise self.fail(f"{name}: {len(starts)} convolutions read the block input; "
                            "a residual block has 1 or 2")
        # The main path's first convolution is the one whose output (after its BatchNorm) is
        # activated; the shortcut's goes to the residual Add.
        main = [n for n in starts if n.op == "Conv" and self._activated(n)]
        if len(main) != 1:
            raise self.fail(f"{name}: no single convolution followed by ReLU reads the block "
                            "input: not a ResNet v1 block")
        conv = main[0]
        kind = {3: "basic", 1: "bottleneck"}.get(self._kernel_size(conv))
        if kind is None:
            raise self.fail(f"{name}: the block starts with a {self._kernel_size(conv)}-wide "
                            "convolution; a BasicBlock starts 3x3, a Bottleneck 1x1")
        if kind == "bottleneck" and list(conv.attrs.get("strides", [1, 1])) != [1, 1]:
            raise self.fail(f"{name}: the stride is on the first 1x1 convolution (the original "
                            "ResNet v1, as MXNet/Caffe build it); only v1.5 (stride on the 3x3 "
                            "convolution, torchvision/timm) is supported")
        # (kernel, stride) of conv1, conv2[, conv3]; a Bottleneck strides (and groups) its 3x3.
        plan = [(3, stride), (3, 1)] if kind == "basic" else [(1, 1), (3, stride), (1, 1)]
        groups = 1
        widths = []
        y = ""
        for i, (kernel, conv_stride) in enumerate(plan):
            if i:
                relu = self._only(y, "Relu", f"{name}.conv{i}")
                conv = self._only(relu.outputs[0], "Conv", f"the ReLU after {name}.conv{i}")
            if kernel == 3 and kind == "bottleneck":  # ResNeXt groups its 3x3 only
                groups = int(conv.attrs.get("group", 1))
            y = self._conv(conv, f"{name}.conv{i + 1}", f"{name}.bn{i + 1}", kernel=kernel,
                           stride=conv_stride, groups=groups if kernel == 3 else 1)
            widths.append(self.sd[f"{name}.conv{i + 1}.weight"].shape[0])
        identity, shortcut = self._shortcut(x, [n for n in starts if n is not main[0]], name,
                                            stride)
        nodes = self.g.consumers(y)
        if len(nodes) != 1 or nodes[0].op != "Add":
            found = ", ".join(n.op for n in nodes) or "nothing"
            raise self.fail(f"{name}: the last convolution feeds {found}, not a residual Add: "
                            "not a ResNet (a plain conv stack?)")
        add = nodes[0]
        if sorted(add.inputs) != sorted([y, self.g.canon(identity)]):
            raise self.fail(f"{name}: the residual Add does not add the block input "
                            "(or its shortcut) to the last convolution")
        after = self.g.consumers(add.outputs[0])
        if len(after) != 1 or after[0].op != "Relu":
            found = ", ".join(n.op for n in after) or "nothing"
            raise self.fail(f"{name}: the residual Add feeds {found}, not a ReLU: pre-activation "
                            "ResNets (v2) are not supported")
        return after[0].outputs[0], _Block(kind, stride, groups, shortcut, tuple(widths))

    def _shortcut(self, x: str, nodes: list[_Node], name: str,
                  stride: int) -> tuple[str, str | None]:
        """Match the shortcut reading ``x``; return (its output tensor, its kind)."""
        if not nodes:
            return x, None
        node = nodes[0]
        if node.op == "Conv":
            out = self._conv(node, f"{name}.downsample.0", f"{name}.downsample.1", kernel=1,
                             stride=stride)
            return out, "conv"
        # ResNet-D (timm avg_down): AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
        a = node.attrs
        got = dict(kernel=list(a.get("kernel_shape", [])), strides=list(a.get("strides", [1, 1])),
                   pads=list(a.get("pads", [0] * 4)), ceil_mode=a.get("ceil_mode", 0),
                   count_include_pad=a.get("count_include_pad", 0))
        want = dict(kernel=[2, 2], strides=[stride] * 2, pads=[0] * 4, ceil_mode=1,
                    count_include_pad=0)
        if got != want or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise self.fail(f"{name}: shortcut AveragePool {got} differs from timm's "
                            f"average-pool downsample {want}")
        conv = self._only(node.outputs[0], "Conv", f"{name}'s shortcut AveragePool")
        out = self._conv(conv, f"{name}.downsample.1", f"{name}.downsample.2", kernel=1, stride=1)
        return out, "avg"

    def _activated(self, conv: _Node) -> bool:
        """True when ``conv``'s output, after its BatchNorm if any, feeds a ReLU only."""
        nodes = self.g.consumers(conv.outputs[0])
        if len(nodes) == 1 and nodes[0].op == "BatchNormalization":
            nodes = self.g.consumers(nodes[0].outputs[0])
        return len(nodes) == 1 and nodes[0].op == "Relu"

    def _kernel_size(self, conv: _Node) -> int:
        w = self.g.const(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if w is None or w.ndim != 4:
            raise self.fail("a convolution's weight is not a constant 4-D tensor")
        return int(w.shape[2]) if w.shape[2] == w.shape[3] else -1

    def _conv(self, conv: _Node, name: str, bn_name: str, kernel: int, stride: int,
              groups: int = 1) -> str:
        """Store convolution ``name`` and its BatchNorm ``bn_name`` (or, in a folded graph, the
        conv's bias); return the tensor after the BatchNorm (if any)."""
        w = self.g.const(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if w is None or w.ndim != 4:
            raise self.fail(f"{name}: convolution weight is not a constant 4-D tensor")
        bias = self.g.const(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] else None
        if len(conv.inputs) > 2 and conv.inputs[2] and bias is None:
            raise self.fail(f"{name}: convolution bias is not constant")
        a = conv.attrs
        pad = kernel // 2
        got = dict(kernel=tuple(w.shape[2:]), strides=list(a.get("strides", [1, 1])),
                   pads=list(a.get("pads", [0] * 4)), group=a.get("group", 1),
                   dilations=list(a.get("dilations", [1, 1])))
        want = dict(kernel=(kernel, kernel), strides=[stride] * 2, pads=[pad] * 4, group=groups,
                    dilations=[1, 1])
        auto_pad = a.get("auto_pad", b"NOTSET")
        if got != want or auto_pad not in (b"NOTSET", "NOTSET"):
            raise self.fail(f"{name}: convolution {got} (auto_pad {auto_pad!r}) differs from "
                            f"the ResNet's {want}")
        channels = w.shape[0]
        if bias is not None and np.size(bias) != channels:
            raise self.fail(f"{name}: bias size {np.size(bias)} does not match {channels} channels")
        self.sd[f"{name}.weight"] = np.ascontiguousarray(w, dtype=np.float32)
        out = conv.outputs[0]
        nodes = self.g.consumers(out)
        if not (len(nodes) == 1 and nodes[0].op == "BatchNormalization"):
            # Folded by the exporter: the conv's bias is all that is left of the BatchNorm.
            self.normalised.append(False)
            self.sd[f"{name}.bias"] = (np.zeros(channels, np.float32) if bias is None
                                       else np.reshape(bias, -1).astype(np.float32))
            return out
        bn = nodes[0]
        if bn.attrs.get("training_mode", 0):
            raise self.fail(f"{name}: BatchNormalization is in training mode")
        stats = [self.g.const(i) for i in bn.inputs[1:5]]
        if len(stats) != 4 or any(s is None for s in stats):
            raise self.fail(f"{name}: BatchNormalization parameters are not constant")
        if any(np.size(s) != channels for s in stats):
            raise self.fail(f"{name}: BatchNorm sizes do not match {channels} channels")
        gamma, beta, mean, var = (np.reshape(s, -1).astype(np.float32) for s in stats)
        if bias is not None and np.any(bias):
            # bn(conv(x) + b) is bn(conv(x)) with the running mean moved by b.
            mean = (mean.astype(np.float64) - np.reshape(bias, -1)).astype(np.float32)
        self.sd.update({f"{bn_name}.weight": gamma, f"{bn_name}.bias": beta,
                        f"{bn_name}.running_mean": mean, f"{bn_name}.running_var": var})
        self.normalised.append(True)
        # The attribute is a float32 in the file; the model adds exactly that float32.
        self.eps.add(float(np.float32(bn.attrs.get("epsilon", _BN_EPS_DEFAULT))))
        return bn.outputs[0]

    def _head(self, x: str) -> int:
        """Store ``fc.weight`` (out, in) and ``fc.bias`` when ``x`` is pooled into a linear layer;
        return its outputs (0 when there is none).

        The features never use the classifier, so a graph that ends otherwise (no head, a custom
        head) is imported without ``fc``.
        """
        nodes = self.g.consumers(x)
        if len(nodes) != 1 or not self._is_spatial_mean(nodes[0]):
            return 0
        t = nodes[0].outputs[0]
        nodes = self.g.consumers(t)
        while len(nodes) == 1 and nodes[0].op in _HEAD_RESHAPES and nodes[0].inputs[0] == t:
            t = nodes[0].outputs[0]
            nodes = self.g.consumers(t)
        if len(nodes) != 1 or nodes[0].inputs[0] != t:
            return 0
        node = nodes[0]
        if node.op == "Gemm" and not node.attrs.get("transA", 0):
            w = self.g.const(node.inputs[1])
            c = self.g.const(node.inputs[2]) if len(node.inputs) > 2 else None
            if w is None or w.ndim != 2:
                return 0
            w = np.asarray(w, np.float64)
            kernel = node.attrs.get("alpha", 1.0) * (w.T if node.attrs.get("transB", 0) else w)
            bias = None if c is None else node.attrs.get("beta", 1.0) * np.asarray(c, np.float64)
        elif node.op == "MatMul":
            kernel = self.g.const(node.inputs[1])
            if kernel is None or kernel.ndim != 2:
                return 0
            bias = None
            after = self.g.consumers(node.outputs[0])
            if len(after) == 1 and after[0].op == "Add":
                others = [self.g.const(i) for i in after[0].inputs if i != node.outputs[0]]
                if len(others) == 1 and others[0] is not None:
                    bias = others[0]
        else:
            return 0
        out = kernel.shape[1]
        if bias is None:
            bias = np.zeros(out)
        if np.size(bias) != out:
            return 0
        # (in, out) as ONNX multiplies -> torch's Linear layout (out, in).
        self.sd["fc.weight"] = np.ascontiguousarray(np.transpose(kernel), dtype=np.float32)
        self.sd["fc.bias"] = np.reshape(bias, -1).astype(np.float32)
        return int(out)

    def _is_spatial_mean(self, node: _Node) -> bool:
        if node.op == "GlobalAveragePool":
            return True
        if node.op != "ReduceMean":
            return False
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1]:
            axes = self.g.const(node.inputs[1])
        return axes is not None and sorted(int(a) % 4 for a in np.ravel(axes)) == [2, 3]
