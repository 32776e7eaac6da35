"""The ONNX graph of a folded NFNet: exported by torch's exporter at the opset asked (converted down where torch
writes no older one), its spatial means made global pools, and checked clean (no standardisation ops, no Identity,
no Cast in fp32, every Conv weight a constant)."""
from __future__ import annotations

import contextlib
import hashlib
import io

import onnx
import torch
from onnx import version_converter
from torch import nn

from .errors import ExportError

__all__ = ["Fp32Graph", "HalfPrecision", "check_clean", "to_onnx"]

_TORCH_MIN_OPSET = 18  # the oldest torch.onnx's exporter writes
_FORBIDDEN_OPS = {"BatchNormalization", "Identity", "InstanceNormalization"}


class HalfPrecision(nn.Module):
    """fp16 weights and compute, fp32 inputs and outputs (one Cast at each end of the graph)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


class Fp32Graph:
    """fp32 graphs exported once for the exports of several precisions (a bundle's fp32 and int8): int8 quantises
    the very graph that fp32 was written from, and torch's exporter, seconds a call, runs once. Graphs are kept by
    what the folded model is (its modules and every tensor), so changed weights are exported anew, never served
    stale."""

    def __init__(self) -> None:
        self._graphs: dict[tuple[str, tuple[int, ...], int], bytes] = {}

    def of(self, folded: nn.Module, shape: tuple[int, int, int], opset: int) -> onnx.ModelProto:
        """``to_onnx(folded, shape, opset)``, exported the first time only (a fresh copy each time)."""
        digest = hashlib.blake2b(repr(folded).encode())
        for name, tensor in folded.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        key = (digest.hexdigest(), tuple(shape), opset)
        if key not in self._graphs:
            self._graphs[key] = to_onnx(folded, shape, opset).SerializeToString()
        return onnx.load_from_string(self._graphs[key])


def to_onnx(module: nn.Module, shape: tuple[int, int, int], opset: int) -> onnx.ModelProto:
    """``module`` as ONNX at ``opset``, batch dynamic. Below opset 20 each GELU is its formula (Erf, or Tanh for
    gelu_tanh); below 18, the oldest torch writes, the graph is converted down by onnx's version converter."""
    example = torch.zeros(2, *shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each pass
        program = torch.onnx.export(module, (example,), input_names=["pixel_values"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), opset_version=max(opset, _TORCH_MIN_OPSET),
                                    external_data=False, dynamo=True, verbose=False)
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's per-node stack traces and names: bytes a runtime never reads
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]
    proto = _global_pools(proto)
    if opset < _TORCH_MIN_OPSET:
        try:
            proto = version_converter.convert_version(proto, opset)
        except Exception as e:  # the converter raises RuntimeError for an operator it has no adapter for
            raise ExportError(f"the graph cannot be converted to opset {opset}: {str(e).splitlines()[-1][:200]}; "
                              f"choose opset {_TORCH_MIN_OPSET} or later") from None
    default = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if [o.version for o in default] != [opset]:
        raise ExportError(f"asked for opset {opset}, the exporter wrote {[o.version for o in default]}")
    return proto


def _global_pools(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Turn each mean over the spatial axes of an NCHW tensor (squeeze-excite, head) into GlobalAveragePool.

    The same function, but ONNX Runtime keeps GlobalAveragePool in int8 (QLinearGlobalAveragePool) and
    in its channels-last layout, where a ReduceMean falls back to float behind a dequantise and reduces
    over strided memory: about a sixth of F0's int8 time at batch 1."""
    graph = proto.graph
    means = {n.input[1] for n in graph.node if n.op_type == "ReduceMean" and len(n.input) == 2}
    if not means:
        return proto
    axes_of = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name in means}
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}

    def pooled(node: onnx.NodeProto) -> onnx.NodeProto:
        axes = axes_of.get(node.input[1]) if node.op_type == "ReduceMean" and len(node.input) == 2 else None
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        if (axes is None or keepdims != 1 or ranks.get(node.input[0]) != 4
                or sorted(int(a) % 4 for a in axes.reshape(-1)) != [2, 3]):
            return node
        return onnx.helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name)

    nodes = [pooled(node) for node in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    return proto


def check_clean(proto: onnx.ModelProto, precision: str) -> None:
    ops = [n.op_type for n in proto.graph.node]
    bad = sorted(set(ops) & _FORBIDDEN_OPS)
    if precision == "fp32" and "Cast" in ops:
        bad.append("Cast")
    if bad:
        raise ExportError(f"the exported graph is not clean: it contains {', '.join(bad)}")
    constants = {i.name for i in proto.graph.initializer}
    produced_by_dq = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    for node in proto.graph.node:
        if node.op_type == "Conv" and node.input[1] not in constants | produced_by_dq:
            raise ExportError(f"Conv {node.name} computes its weight at run time ({node.input[1]})")
