"""ONNX graphs of torchvision-layout ResNet18/34 -> the zoo's parameter tree.

Exporters name nodes and initializers as they please, so nothing here reads a name: the importer
folds constant subgraphs, then walks the graph from its input (stem Conv -> ReLU -> MaxPool, then
BasicBlocks, then the pooled linear head), matches each piece by operator, attributes and which
tensors are constant, and gives the parameters torchvision's module names by position. BatchNorm
that the exporter folded into the conv (conv bias) and BatchNorm left as a separate node both end
in the same folded conv kernel + bias, through :func:`fold_bn`.

onnx is imported here and nowhere else (it is the ``onnx`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddscore_jax.converters._common import (
    ImportedModel,
    detect_arch,
    first_line,
    fold_bn,
    split_backbone,
)
from ddscore_jax.errors import InputError

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


def load_onnx(path: Path) -> ImportedModel:
    """Read an ONNX torchvision ResNet18/34 into :class:`ImportedModel` (folded, HWIO, float32).

    External weights are read only from inside the model's folder. The head holds ``layer4.*`` and,
    when the graph ends in pooling plus a linear layer, ``fc.kernel`` (in, out) and ``fc.bias``.
    Raises InputError naming ``path`` for anything that is not such a graph.
    """
    try:
        import onnx
    except ImportError:
        raise InputError(f"{path}: importing ONNX models needs onnx: "
                         "pip install 'ddscore-jax[onnx]'") from None
    source = str(path)
    proto = _read_model(onnx, Path(path), source)
    graph = _Graph(onnx, proto, Path(path), source)
    flat = _Walker(graph, source).walk()
    convs = [k.removesuffix(".kernel") for k in flat if k.endswith(".kernel") and k != "fc.kernel"]
    return split_backbone(detect_arch(convs, source), flat, source)


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


class _Walker:
    """Matches the graph to torchvision's ResNet layout, from the input to the classifier."""

    def __init__(self, graph: _Graph, source: str):
        self.g = graph
        self.source = source
        self.flat: dict[str, np.ndarray] = {}

    def fail(self, problem: str) -> InputError:
        return InputError(f"{self.source}: {problem}")

    def walk(self) -> dict[str, np.ndarray]:
        """Return the flat tree: ``conv1``, ``layer1..4.*`` (folded, HWIO) and ``fc.*`` if any."""
        try:
            return self._walk()
        except InputError:
            # Where the match fails in a v2 graph depends on its stem; name the real cause.
            if self.g.normalises_non_conv_outputs():
                raise self.fail("pre-activation ResNet (v2: BatchNorm and ReLU before each "
                                "convolution) is not supported; only torchvision's ResNet18/34 "
                                "(v1)") from None
            raise

    def _walk(self) -> dict[str, np.ndarray]:
        if len(self.g.inputs) != 1:
            raise self.fail(f"expected one image input, found {len(self.g.inputs)} graph inputs")
        x = self._stem(self.g.inputs[0])
        stage, index, blocks = 0, 0, []
        while True:
            convs = [n for n in self.g.consumers(x) if n.op == "Conv"]
            if not convs:
                break
            # torchvision's layer1 keeps its width: a downsample shortcut starts each later stage.
            has_downsample = len(convs) > 1
            if blocks and has_downsample:
                stage, index = stage + 1, 0
            if stage >= _STAGES:
                raise self.fail(f"more than {_STAGES} residual stages: not a ResNet18/34")
            name = f"layer{stage + 1}.{index}"
            x = self._block(x, convs, name, stride=2 if has_downsample and blocks else 1)
            blocks.append(name)
            index += 1
        if not blocks:
            found = ", ".join(sorted({n.op for n in self.g.consumers(x)})) or "nothing"
            hint = " (pre-activation ResNet v2?)" if "BatchNormalization" in found else ""
            raise self.fail(f"no residual block after the stem's MaxPool: it feeds {found}{hint}; "
                            "expected a torchvision ResNet BasicBlock")
        if stage + 1 < _STAGES:
            missing = "conv4_x ('layer3') and layer4" if stage + 1 < 3 else "layer4"
            raise self.fail(f"graph ends after {blocks[-1]} with {stage + 1} residual stages; "
                            f"{missing} missing (truncated graph?)")
        self._head(x)
        return self.flat

    # -- pieces --------------------------------------------------------------------------------

    def _only(self, tensor: str, op: str, after: str) -> _Node:
        nodes = self.g.consumers(tensor)
        if len(nodes) != 1 or nodes[0].op != op:
            found = ", ".join(n.op for n in nodes) or "nothing (graph output)"
            raise self.fail(f"expected {op} after {after}, found {found}")
        return nodes[0]

    def _stem(self, image: str) -> str:
        conv = self._only(image, "Conv", "the image input")
        x = self._conv(conv, "conv1", kernel=7, stride=2)
        relu = self._only(x, "Relu", "the stem convolution 'conv1'")
        pool = self._only(relu.outputs[0], "MaxPool", "the stem's ReLU")
        a = pool.attrs
        if (list(a.get("kernel_shape", [])) != [3, 3] or list(a.get("strides", [1, 1])) != [2, 2]
                or list(a.get("pads", [0] * 4)) != [1] * 4 or a.get("ceil_mode", 0)
                or list(a.get("dilations", [1, 1])) != [1, 1]
                or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            raise self.fail(f"stem MaxPool is not torchvision's 3x3/stride 2/padding 1 ({a})")
        return pool.outputs[0]

    def _block(self, x: str, convs: list[_Node], name: str, stride: int) -> str:
        """Match one BasicBlock starting at tensor ``x``; return its output tensor."""
        if len(convs) > 2:
            raise self.fail(f"{name}: {len(convs)} convolutions read the block input; "
                            "a BasicBlock has 1 or 2")
        sizes = [self._kernel_size(c) for c in convs]
        if 3 not in sizes:
            raise self.fail(f"{name}: the block starts with a {sizes[0]}x{sizes[0]} convolution, "
                            "not 3x3: Bottleneck ResNets (resnet50 and up) are not supported; "
                            "only ResNet18/34")
        conv1 = convs[sizes.index(3)]
        identity = x
        if len(convs) == 2:
            ds = convs[1 - sizes.index(3)]
            if self._kernel_size(ds) != 1:
                raise self.fail(f"{name}: shortcut convolution is not 1x1")
            identity = self._conv(ds, f"{name}.downsample", kernel=1, stride=stride)
        y = self._conv(conv1, f"{name}.conv1", kernel=3, stride=stride)
        relu = self._only(y, "Relu", f"{name}.conv1")
        conv2 = self._only(relu.outputs[0], "Conv", f"the ReLU after {name}.conv1")
        y = self._conv(conv2, f"{name}.conv2", kernel=3, stride=1)
        nodes = self.g.consumers(y)
        if len(nodes) != 1 or nodes[0].op != "Add":
            found = ", ".join(n.op for n in nodes) or "nothing"
            raise self.fail(f"{name}: the second convolution feeds {found}, not a residual Add: "
                            "not a ResNet (a plain conv stack?)")
        add = nodes[0]
        if sorted(add.inputs) != sorted([y, self.g.canon(identity)]):
            raise self.fail(f"{name}: the residual Add does not add the block input "
                            "(or its downsample shortcut) to the second convolution")
        after = self.g.consumers(add.outputs[0])
        if len(after) != 1 or after[0].op != "Relu":
            found = ", ".join(n.op for n in after) or "nothing"
            raise self.fail(f"{name}: the residual Add feeds {found}, not a ReLU: pre-activation "
                            "ResNets (v2) are not supported")
        return after[0].outputs[0]

    def _kernel_size(self, conv: _Node) -> int:
        w = self.g.const(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if w is None or w.ndim != 4:
            raise self.fail("a convolution's weight is not a constant 4-D tensor")
        return int(w.shape[2]) if w.shape[2] == w.shape[3] else -1

    def _conv(self, conv: _Node, name: str, kernel: int, stride: int) -> str:
        """Store ``name``'s folded kernel and bias; return the tensor after its BatchNorm (if any).

        One code path for both forms: a conv without a BatchNorm node (the exporter folded it)
        goes through ``fold_bn`` with the identity BatchNorm, which changes nothing exactly.
        """
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
        want = dict(kernel=(kernel, kernel), strides=[stride] * 2, pads=[pad] * 4, group=1,
                    dilations=[1, 1])
        auto_pad = a.get("auto_pad", b"NOTSET")
        if got != want or auto_pad not in (b"NOTSET", "NOTSET"):
            raise self.fail(f"{name}: convolution {got} (auto_pad {auto_pad!r}) differs from "
                            f"torchvision's {want}")
        out = conv.outputs[0]
        nodes = self.g.consumers(out)
        if len(nodes) == 1 and nodes[0].op == "BatchNormalization":
            bn = nodes[0]
            if bn.attrs.get("training_mode", 0):
                raise self.fail(f"{name}: BatchNormalization is in training mode")
            stats = [self.g.const(i) for i in bn.inputs[1:5]]
            if len(stats) != 4 or any(s is None for s in stats):
                raise self.fail(f"{name}: BatchNormalization parameters are not constant")
            eps = float(bn.attrs.get("epsilon", _BN_EPS_DEFAULT))
            out = bn.outputs[0]
        else:
            ones, zeros = np.ones(w.shape[0]), np.zeros(w.shape[0])
            stats, eps = [ones, zeros, zeros, ones], 0.0
        if any(np.size(s) != w.shape[0] for s in stats) or (bias is not None
                                                            and np.size(bias) != w.shape[0]):
            raise self.fail(f"{name}: bias/BatchNorm sizes do not match {w.shape[0]} channels")
        flat_bias = None if bias is None else np.reshape(bias, -1)
        self.flat[f"{name}.kernel"], self.flat[f"{name}.bias"] = fold_bn(
            w, flat_bias, *(np.reshape(s, -1) for s in stats), eps)
        return out

    def _head(self, x: str) -> None:
        """Store ``fc.kernel`` (in, out) and ``fc.bias`` when ``x`` is pooled into a linear layer.

        The features never use the classifier, so a graph that ends otherwise (no head, a custom
        head) is imported without ``fc``.
        """
        nodes = self.g.consumers(x)
        if len(nodes) != 1 or not self._is_spatial_mean(nodes[0]):
            return
        t = nodes[0].outputs[0]
        nodes = self.g.consumers(t)
        while len(nodes) == 1 and nodes[0].op in _HEAD_RESHAPES and nodes[0].inputs[0] == t:
            t = nodes[0].outputs[0]
            nodes = self.g.consumers(t)
        if len(nodes) != 1 or nodes[0].inputs[0] != t:
            return
        node = nodes[0]
        if node.op == "Gemm" and not node.attrs.get("transA", 0):
            w = self.g.const(node.inputs[1])
            c = self.g.const(node.inputs[2]) if len(node.inputs) > 2 else None
            if w is None or w.ndim != 2:
                return
            kernel = node.attrs.get("alpha", 1.0) * (w.T if node.attrs.get("transB", 0) else w)
            bias = None if c is None else node.attrs.get("beta", 1.0) * np.asarray(c, np.float64)
        elif node.op == "MatMul":
            kernel = self.g.const(node.inputs[1])
            if kernel is None or kernel.ndim != 2:
                return
            bias = None
            after = self.g.consumers(node.outputs[0])
            if len(after) == 1 and after[0].op == "Add":
                others = [self.g.const(i) for i in after[0].inputs if i != node.outputs[0]]
                if len(others) == 1 and others[0] is not None:
                    bias = others[0]
        else:
            return
        out = kernel.shape[1]
        if bias is None:
            bias = np.zeros(out)
        if np.size(bias) != out:
            return
        self.flat["fc.kernel"] = np.ascontiguousarray(kernel, dtype=np.float32)
        self.flat["fc.bias"] = np.reshape(bias, -1).astype(np.float32)

    def _is_spatial_mean(self, node: _Node) -> bool:
        if node.op == "GlobalAveragePool":
            return True
        if node.op != "ReduceMean":
            return False
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1]:
            axes = self.g.const(node.inputs[1])
        return axes is not None and sorted(int(a) % 4 for a in np.ravel(axes)) == [2, 3]
