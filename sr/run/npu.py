"""INT8 as an NPU runs it: Qualcomm's Hexagon NPU (HTP) arithmetic as `onnxruntime-qnn` simulates it on x86, and
the bundle's full-integer `.tflite` in LiteRT's interpreter (XNNPACK or the reference kernels).

Each is an engine like the others (`sr.run.engines.Seamless`: whole images up to TILE a side, seamless tiles
beyond) and is conformance-checked against the reference by `sr.run.runtime` before any figure is shown. The QDQ
model goes to the HTP as the lab wrote it, with lowerings a deployment converter makes too and that change no
number: each LeakyRelu as a PRelu on an INT8 slope (`prelu_for_htp`), the image quantized at the graph's edge
when only value moves lie before the first quantizer or after the last (`quantized_moves`), an exported erf GELU
as one Gelu and an exported F.normalize as one LpNormalization (`units_for_htp`), and for each compiled size a
float scalar computed from tensor shapes as an exact INT8 constant (`size_scalars_for_htp`).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

import numpy as np
import onnx

from .engines import Seamless
from .sessions import fixed_size, ort_session
from ..graph import GeluUnit, GraphIndex, op_units
from ..store import Memo


HTP_ARCHS = ("68", "69", "73", "75", "79", "81")  # Hexagon HTP generations libQnnHtp simulates (htp_arch)
DEFAULT_HTP_ARCH = "73"  # Snapdragon 8 Gen 2


def qnn_available() -> bool:
    """True when Qualcomm's QNN execution provider (PyPI `onnxruntime-qnn`, a plugin of onnxruntime) imports."""
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        return False
    return True


_QNN_LOCK = threading.Lock()
_QNN_REGISTERED: list[bool] = []


def _qnn_devices():
    """The QNN plugin's devices (the plugin library registered with ONNX Runtime once per process)."""
    import onnxruntime as ort
    import onnxruntime_qnn

    with _QNN_LOCK:
        if not _QNN_REGISTERED:
            ort.register_execution_provider_library(onnxruntime_qnn.get_ep_name(), onnxruntime_qnn.get_library_path())
            _QNN_REGISTERED.append(True)
    return [d for d in ort.get_ep_devices() if d.ep_name == onnxruntime_qnn.get_ep_name()]


def static_input(model: onnx.ModelProto, size: tuple[int, int]) -> onnx.ModelProto:
    """A copy of a 1x3xHxW-input model with its input fixed to 1x3x`size` and its outputs' shapes left to
    inference (an NPU compiles a graph for one shape)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (1, 3, *size)):
        dim.Clear()
        dim.dim_value = value
    for output in fixed.graph.output:
        output.type.tensor_type.ClearField("shape")
    del fixed.graph.value_info[:]
    return fixed


def prelu_for_htp(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a QDQ model with each LeakyRelu written as PRelu on an INT8 slope that is alpha exactly
    (`_exact_int8`), as Qualcomm's own converter maps it. ONNX Runtime's QNN builder for LeakyRelu quantizes the
    slope as UINT8 and HTP then refuses the node beside INT8 activations; a PRelu with a quantized slope maps whole."""

    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    nodes = []
    for node in lowered.graph.node:
        if node.op_type != "LeakyRelu":
            nodes.append(node)
            continue
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 0.01)
        if alpha == 0:  # a LeakyRelu with no slope is a ReLU (a slope at step 0 is no valid quantization)
            nodes.append(onnx.helper.make_node("Relu", [node.input[0]], list(node.output), name=node.name))
            continue
        stem = f"{node.output[0]}_htp_slope"
        initializers, dequantizer = _exact_int8(alpha, stem, f"{node.name}_slope")
        lowered.graph.initializer.extend(initializers)
        nodes.append(dequantizer)
        nodes.append(onnx.helper.make_node("PRelu", [node.input[0], stem], list(node.output), name=node.name))
    del lowered.graph.node[:]
    lowered.graph.node.extend(nodes)
    return lowered


def _exact_int8(value: float, stem: str, name: str) -> tuple[list, onnx.NodeProto]:
    """(initializers, DequantizeLinear to `stem`) of a float scalar as an INT8 constant that dequantizes to it
    exactly: +-64 at step |value| / 64 (a power of two apart, so the product is the value itself)."""
    from onnx import numpy_helper
    from ..quant.quantspec import exact_int8

    level, step = exact_int8(value)
    initializers = [numpy_helper.from_array(np.array(level, np.int8), f"{stem}_q"),
                    numpy_helper.from_array(np.array(step, np.float32), f"{stem}_scale"),
                    numpy_helper.from_array(np.array(0, np.int8), f"{stem}_zero")]
    return initializers, onnx.helper.make_node("DequantizeLinear", [f"{stem}_q", f"{stem}_scale", f"{stem}_zero"],
                                               [stem], name=name)


def units_for_htp(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a QDQ model with each erf GELU (`sr.graph.gelu_units`: five nodes between one dequantizer and one
    quantizer, as exporters write it) as one Gelu node, and each exported F.normalize (`sr.graph.l2norm_units`:
    ReduceL2, Clip, Expand, Div) as one LpNormalization (p = 2), the same functions, as Qualcomm's converter maps
    them: HTP has Gelu and L2Norm, and no Erf or ReduceL2. The shape arithmetic only the units read goes too."""
    from ..quant.quantspec import constant_arrays

    units = op_units(GraphIndex(model), constant_arrays(model))
    if not units:
        return model
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    last = {unit.nodes[-1]: unit for unit in units}
    inner = {name for unit in units for name in unit.nodes[:-1]}

    def one_op(node: onnx.NodeProto) -> onnx.NodeProto:
        unit = last[node.name]
        if isinstance(unit, GeluUnit):
            return onnx.helper.make_node("Gelu", [unit.input], [unit.output], name=node.name, domain="com.microsoft")
        return onnx.helper.make_node("LpNormalization", [unit.input], [unit.output], name=node.name, axis=unit.axis, p=2)

    nodes = [one_op(n) if n.name in last else n for n in lowered.graph.node if n.name not in inner]
    wanted = {o.name for o in lowered.graph.output}
    while True:  # what no one reads any more (the units' constants, an Expand's shape arithmetic) goes
        read = wanted | {t for n in nodes for t in n.input}
        kept = [n for n in nodes if any(o in read for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del lowered.graph.node[:]
    lowered.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in lowered.opset_import):
        lowered.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return lowered


def size_scalars_for_htp(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a static-shaped QDQ model whose float scalars computed from tensor shapes (an attention's
    1 / sqrt(H x W), read by a Div or Mul beside a quantized tensor) are INT8 constants, each exact (64 at step
    |c| / 64, `_exact_int8`), as a converter folds them for the shape it compiles: the HTP has no float kernels.
    The values are read by running the graph once on ONNX Runtime's CPU at this shape. A model without such
    scalars comes back as it is."""
    index = GraphIndex(model)
    known = {init.name for init in model.graph.initializer}

    decided: dict[str, bool] = {}

    def from_shapes(tensor: str) -> bool:
        """True when `tensor` is computed from tensor shapes and constants only (each tensor decided once)."""
        if tensor not in decided:
            decided[tensor] = False  # (a cycle, in a malformed graph, decides False)
            node = index.producer(tensor)
            decided[tensor] = tensor in known if node is None else node.op_type == "Shape" or (
                node.op_type not in ("DequantizeLinear", "QuantizeLinear") and all(
                    from_shapes(t) for t in node.input if t))
        return decided[tensor]

    def dequantized(tensor: str) -> bool:
        return getattr(index.producer(tensor), "op_type", None) == "DequantizeLinear"

    readers = [(node, k) for node in model.graph.node if node.op_type in ("Div", "Mul") and any(map(dequantized, node.input))
               for k, t in enumerate(node.input) if t not in known and index.producer(t) is not None
               and index.producer(t).op_type not in ("DequantizeLinear", "Constant") and from_shapes(t)]
    if not readers:
        return model
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    names = list(dict.fromkeys(node.input[k] for node, k in readers))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = ort_session(probe, threads=1, log_level=3)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    values = session.run(names, {session.get_inputs()[0].name: np.zeros(shape, np.float32)})
    dequantizers = []
    for name, value in zip(names, values):
        if np.asarray(value).size != 1:
            continue
        c = float(np.asarray(value).reshape(-1)[0])
        if c == 0 or not np.isfinite(c):
            continue
        stem = f"{name}_htp_constant"
        initializers, dequantizer = _exact_int8(c, stem, stem)
        lowered.graph.initializer.extend(initializers)
        dequantizers.append(dequantizer)
        for node in lowered.graph.node:
            if node.op_type in ("Div", "Mul"):
                node.input[:] = [stem if t == name else t for t in node.input]
    nodes = dequantizers + list(lowered.graph.node)
    del lowered.graph.node[:]
    lowered.graph.node.extend(nodes)
    return lowered


_MOVES = ("Pad", "Identity", "Slice", "Transpose", "Reshape", "DepthToSpace")  # ops that only move values


def quantized_moves(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a QDQ model with the image quantized where it enters and leaves the graph when only value moves
    (the lab's wrapper: a pad up to an accepted size, a crop back) lie between the graph's input and its first
    QuantizeLinear, or between its last DequantizeLinear and the output: the same Q/DQ pair is put at the graph's
    edge. A pad or a crop of quantized values is the quantized pad or crop, so the numbers do not change; the NPU
    then runs the moves on INT8, as a deployed graph does, instead of refusing a float island."""
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    graph = edited.graph
    index = GraphIndex(graph)
    consumers, producers = index.consumers, index.producers
    added_before, added_after = [], []

    def value_readers(tensor: str) -> list:
        return [r for r in consumers.get(tensor, []) if r.op_type != "Shape"]  # a Shape reads no value

    def first_quantizer(tensor: str):
        readers = value_readers(tensor)
        if len(readers) != 1:
            return None
        if readers[0].op_type == "QuantizeLinear":
            return readers[0]
        return first_quantizer(readers[0].output[0]) if readers[0].op_type in _MOVES else None

    def last_dequantizer(tensor: str):
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear":
            return node
        return last_dequantizer(node.input[0]) if node.op_type in _MOVES else None

    image = graph.input[0].name
    quantizer = first_quantizer(image)
    if quantizer is not None and value_readers(image)[0] is not quantizer:
        for reader in value_readers(image):
            reader.input[list(reader.input).index(image)] = f"{image}_edge_dequantized"
        added_before = [onnx.helper.make_node("QuantizeLinear", [image, *quantizer.input[1:]], [f"{image}_edge_q"]),
                        onnx.helper.make_node("DequantizeLinear", [f"{image}_edge_q", *quantizer.input[1:]],
                                              [f"{image}_edge_dequantized"])]
    result = graph.output[0].name
    dequantizer = last_dequantizer(result)
    if dequantizer is not None and producers[result] is not dequantizer:
        producers[result].output[list(producers[result].output).index(result)] = f"{result}_edge_float"
        added_after = [onnx.helper.make_node("QuantizeLinear", [f"{result}_edge_float", *dequantizer.input[1:]],
                                             [f"{result}_edge_q"]),
                       onnx.helper.make_node("DequantizeLinear", [f"{result}_edge_q", *dequantizer.input[1:]],
                                             [result])]
    nodes = added_before + list(graph.node) + added_after
    del graph.node[:]
    graph.node.extend(nodes)
    return edited


def float_islands(model: onnx.ModelProto) -> list[str]:
    """The op types of a QDQ model that compute in float between its quantized tensors (a float output read by
    anything but a QuantizeLinear), in graph order: what an all-INT8 NPU has no kernel for."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # inference is a help here: without it nothing is named
        return []
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output]}
    index = GraphIndex(model)
    found = [node.op_type for node in model.graph.node
             if node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Constant") and any(
                 types.get(o) == onnx.TensorProto.FLOAT and any(r.op_type != "QuantizeLinear" for r in index.readers(o))
                 for o in node.output)]
    return list(dict.fromkeys(found))


class QnnHtpEngine(Seamless):
    """Qualcomm's Hexagon NPU (HTP) arithmetic, simulated on x86 by `libQnnHtp.so` from `onnxruntime-qnn`: a QDQ
    model compiled by the QNN execution provider for one HTP generation (`htp_arch`), with ONNX Runtime's CPU
    fallback turned off, so a graph the HTP cannot run whole is refused in words rather than run half on the CPU.

    HTP graphs have static shapes: the graph is compiled once per input shape (the last few kept), and images run
    whole up to TILE a side, larger ones in seamless tiles, exactly as the reference runs them (a fixed-size tile
    with mirrored borders would change the border pixels). The NPU requantizes with its own rounding, so its
    output is a few levels from the lab's reference by design; `NPU_TOLERANCE` says how far.
    """

    def __init__(self, qdq_onnx: str | os.PathLike, scale: int, htp_arch: str = DEFAULT_HTP_ARCH,
                 name: str = "qnn-htp"):
        if str(htp_arch) not in HTP_ARCHS:
            raise ValueError(f"unknown HTP generation {htp_arch!r}; choose one of: {', '.join(HTP_ARCHS)}")
        if not qnn_available():
            raise ValueError("the qnn-htp engine needs Qualcomm's QNN execution provider: pip install "
                             "onnxruntime-qnn (requirements.txt has it)")
        self.model = quantized_moves(units_for_htp(prelu_for_htp(onnx.load(str(qdq_onnx)))))
        dims = self.model.graph.input[0].type.tensor_type.shape.dim
        self.fixed = fixed_size([d.dim_value if d.HasField("dim_value") else None for d in dims])
        self.scale, self.path, self.htp_arch = scale, Path(qdq_onnx), str(htp_arch)
        self.name = f"{name}-v{self.htp_arch}"
        self.sessions = Memo(4)  # input shape -> its compiled graph
        self.lock = threading.Lock()
        self._session(self.fixed or (16, 16))  # a graph the HTP cannot take is refused here, not at the first run

    def _session(self, size: tuple[int, int]):
        return self.sessions.get(size, lambda: self._compiled(size))

    def _compiled(self, size: tuple[int, int]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        options.add_provider_for_devices(_qnn_devices(), {"backend_type": "htp", "htp_arch": self.htp_arch,
                                                          "offload_graph_io_quantization": "0"})
        try:
            with _stdout_to_stderr():  # libQnnHtp prints a banner on stdout (it would corrupt --json output)
                return ort.InferenceSession(size_scalars_for_htp(static_input(self.model, size)).SerializeToString(),
                                            options)
        except Exception as error:  # onnxruntime's Fail: nodes left for the CPU, or an op HTP does not take
            islands = float_islands(self.model)
            named = f"; ops it would run in float: {', '.join(islands)}" if islands else ""
            raise ValueError(f"the Hexagon NPU (HTP v{self.htp_arch}) cannot run all of {self.path.name}: "
                             f"{str(error).splitlines()[0][:300]}{named} (a scheme that leaves ops in float, such "
                             "as tensorrt, cannot run whole on an NPU: use npu, npu-per-tensor or npu-symmetric)") \
                from error

    def _run_array(self, array: np.ndarray) -> np.ndarray:
        with self.lock:
            session = self._session(tuple(array.shape[2:4]))
            return session.run(None, {session.get_inputs()[0].name: array})[0]


SOME_SIZE = (48, 48)  # a size-dependent .tflite's input and output grids are read from its file at this size


def litert_available() -> bool:
    """True when LiteRT's interpreter (PyPI `ai-edge-litert`) imports."""
    try:
        from ai_edge_litert import interpreter  # noqa: F401
    except ImportError:
        return False
    return True


class LiteRTEngine(Seamless):
    """A full-integer INT8 `.tflite` (`sr.run.tflite`) in LiteRT's interpreter on the CPU: XNNPACK's kernels (the
    default delegate, what phones' CPUs run) or TFLite's reference kernels (`kernels="reference"`: the integer
    arithmetic as the specification's reference implementation, and tflite-micro, compute it).

    The image goes in as INT8 on the model's input grid (for the lab's [0, 1] input, pixel p is p - 128) and comes
    out the same way; one interpreter per input shape (the last few kept), images up to TILE a side whole. A
    user's graph that takes something else than the lab's image (Y, NHWC, [0, 255], pre-upsampled, a least size)
    gets it from the lab's wrapper in float (`wrapper`: `sr.model.wrapper.WrapperParts`, run by ONNX Runtime
    exactly as the reference runs it), and its output goes back through the wrapper's other side. A graph that
    computes a float from the image's size (an attention's 1 / sqrt(H x W)) runs the file written for each size
    (`per_size`, as a converter folds that float for the shape it converts).
    """

    def __init__(self, tflite: str | os.PathLike | None, scale: int, kernels: str = "xnnpack", name: str = "litert",
                 wrapper=None, nhwc: bool = False, per_size=None):
        from .tflitefile import image_qparams

        if kernels not in ("xnnpack", "reference"):
            raise ValueError(f"unknown LiteRT kernels {kernels!r}; choose one of: xnnpack, reference")
        if not litert_available():
            raise ValueError("the litert engines need LiteRT's interpreter: pip install ai-edge-litert "
                             "(requirements.txt has it)")
        # a graph that computes a float from the image's size has a file per size: `per_size((h, w))` gives it
        self.per_size = per_size
        self.sizes: list[tuple[int, int]] = []  # the input sizes it ran, in order (the first 64)
        self.path, self.scale, self.kernels = Path(tflite) if tflite else per_size(SOME_SIZE), scale, kernels
        self.content = self.path.read_bytes()
        self.input_q, self.output_q = image_qparams(self.content)
        self.name = name
        self.interpreters = Memo(4)  # input shape -> its interpreter (not reentrant: used under `lock`)
        self.lock = threading.Lock()
        self.wrapper, self.nhwc = wrapper, nhwc  # the user's graph takes and gives NHWC itself
        self.sides = [None if part is None else ort_session(part, threads=1)
                      for part in ((wrapper.before, wrapper.after) if wrapper else (None, None))]

    def _interpreter(self, shape: tuple):
        return self.interpreters.get(shape, lambda: self._allocated(shape))

    def _allocated(self, shape: tuple):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = OpResolverType.BUILTIN if self.kernels == "xnnpack" else OpResolverType.BUILTIN_REF
        content = self.per_size(tuple(shape[1:3])).read_bytes() if self.per_size else self.content
        interpreter = Interpreter(model_content=content, experimental_op_resolver_type=resolver,
                                  num_threads=max(1, min(4, os.cpu_count() or 1)))
        interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], list(shape), strict=False)
        interpreter.allocate_tensors()
        return interpreter

    def _run_array(self, array: np.ndarray) -> np.ndarray:
        before, after = self.sides
        user = before.run(None, {before.get_inputs()[0].name: array})[0] if before else array
        result = self._run_user(user)
        if after is None:
            return result
        feeds = {i.name: result if i.name == self.wrapper.user_output else array for i in after.get_inputs()}
        return after.run(None, feeds)[0]

    def _run_user(self, array: np.ndarray) -> np.ndarray:
        """The .tflite on the user's own input (NCHW, or NHWC for a graph that takes it), its output alike."""
        (in_scale, in_zero), (out_scale, out_zero) = self.input_q, self.output_q
        image = array if self.nhwc else array[0].transpose(1, 2, 0)[None]
        quantized = np.clip(np.rint(image / np.float32(in_scale)) + in_zero, -128, 127).astype(np.int8)
        with self.lock:
            if len(self.sizes) < 64:
                self.sizes.append(tuple(int(d) for d in quantized.shape[1:3]))
            interpreter = self._interpreter(quantized.shape)
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], quantized)
            interpreter.invoke()
            result = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        values = (result.astype(np.float32) - np.float32(out_zero)) * np.float32(out_scale)
        return values if self.nhwc else np.ascontiguousarray(values.transpose(0, 3, 1, 2))


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 pointed at 2 for the duration (a native library's banner kept off stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


__all__ = ["HTP_ARCHS", "DEFAULT_HTP_ARCH", "qnn_available", "litert_available", "static_input", "prelu_for_htp",
           "quantized_moves", "float_islands", "QnnHtpEngine", "LiteRTEngine"]
