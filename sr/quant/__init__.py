"""How any ONNX graph is quantized, knowing nothing of networks or weights: the spec of each INT8 scheme
(`quantspec`, with ModelOpt's TensorRT fusion rules in `trtfusion`), what a written QDQ model quantizes, read back
(`readback`), a calibration's config (`calibrate`), its images (`calibdata`), the tensor statistics (`statistics`)
and the range searches (`searches`), the recipe and its cache key (`recipe`), the QDQ writer and its rewrites
(`qdq`, `rewrite`), and a calibration's cached entry (`calibrated`). Imports only the top-level modules of `sr`."""
from .. import _public_of

__all__, __getattr__ = _public_of(__name__)  # its public calls, each imported when first asked for
