"""The .tflite file itself, below the op-by-op writer (`sr.run.tflite`): one subgraph's tensors, buffers, operator codes
and operators built with the flatbuffer object API that ships with LiteRT (`ai_edge_litert.schema_py_generated`:
`Flatbuffer`), the image's quantization read back from a written file (`image_qparams`), an ONNX node's attribute
as the writers read it (`attribute`), and what the writers refuse a graph with (`TfliteUnsupported`).
"""
from __future__ import annotations

import numpy as np
import onnx


class TfliteUnsupported(ValueError):
    """A graph the .tflite writer cannot express (the message names the op or the tensor)."""



def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of `node`'s attribute `name` (`default` when it has none)."""
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else onnx.helper.get_attribute_value(found)



class Flatbuffer:
    """The tensors, buffers, operator codes and operators of one subgraph, as LiteRT's object API builds them."""

    def __init__(self):
        from ai_edge_litert import schema_py_generated as schema

        self.schema = schema
        self.tensors, self.buffers, self.operators = [], [schema.BufferT()], []
        self.codes: dict[int, int] = {}
        self.index: dict[str, int] = {}

    def tensor(self, name: str, channels: int | None, qparams, data: np.ndarray | None = None,
               dtype: int | None = None, axis: int = 0, signature: list[int] | None = None) -> int:
        """An INT8 activation made at run time (NHWC with `channels`, or of `signature`: -1 where the image's
        size decides) or, with `data`, a constant of `dtype`; its index."""
        schema = self.schema
        tensor = schema.TensorT()
        tensor.name = name
        if data is None:
            signature = [1, -1, -1, channels] if signature is None else list(signature)
            tensor.shape, tensor.shapeSignature = [1 if d < 0 else d for d in signature], signature
            tensor.type = schema.TensorType.INT8
            tensor.buffer = 0
        else:
            tensor.shape = list(data.shape)
            tensor.type = dtype
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(buffer)
            tensor.buffer = len(self.buffers) - 1
        quantization = schema.QuantizationParametersT()
        scales, zeros = qparams
        quantization.scale = [float(s) for s in np.atleast_1d(scales)]
        quantization.zeroPoint = [int(z) for z in np.atleast_1d(zeros)]
        quantization.quantizedDimension = axis
        tensor.quantization = quantization
        self.tensors.append(tensor)
        if data is None:
            self.index[name] = len(self.tensors) - 1
        return len(self.tensors) - 1

    def plain(self, name: str, shape: list[int], dtype: int) -> int:
        """An unquantized tensor made at run time (an INT32 shape)."""
        tensor = self.schema.TensorT()
        tensor.name, tensor.shape, tensor.type, tensor.buffer = name, shape, dtype, 0
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def operator(self, op: str, inputs: list[int], outputs: list[int], options=None, kind: str | None = None):
        schema = self.schema
        code = getattr(schema.BuiltinOperator, op)
        self.codes.setdefault(code, len(self.codes))
        operator = schema.OperatorT()
        operator.opcodeIndex, operator.inputs, operator.outputs = self.codes[code], inputs, outputs
        if options is not None:
            operator.builtinOptionsType = getattr(schema.BuiltinOptions, kind)
            operator.builtinOptions = options
        self.operators.append(operator)

    def model(self, inputs: list[int], outputs: list[int]) -> bytes:
        import flatbuffers

        schema = self.schema
        subgraph = schema.SubGraphT()
        subgraph.tensors, subgraph.inputs, subgraph.outputs = self.tensors, inputs, outputs
        subgraph.operators, subgraph.name = self.operators, "main"
        model = schema.ModelT()
        model.version, model.description = 3, "SR INT8 Lab: full-integer INT8 from the lab's spec and ranges"
        codes = []
        for code, _ in sorted(self.codes.items(), key=lambda item: item[1]):
            made = schema.OperatorCodeT()
            made.builtinCode, made.deprecatedBuiltinCode, made.version = code, min(code, 127), 1
            codes.append(made)
        model.operatorCodes, model.subgraphs, model.buffers = codes, [subgraph], self.buffers
        builder = flatbuffers.Builder(1 << 16)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def image_qparams(tflite: bytes) -> tuple[tuple[float, int], tuple[float, int]]:
    """((scale, zero point) of the input, of the output) of a .tflite the lab wrote."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite, 0))
    graph = model.subgraphs[0]
    found = []
    for index in (graph.inputs[0], graph.outputs[0]):
        q = graph.tensors[index].quantization
        found.append((float(q.scale[0]), int(q.zeroPoint[0])))
    return found[0], found[1]


__all__ = ["Flatbuffer", "TfliteUnsupported", "attribute", "image_qparams"]
