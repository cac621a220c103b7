"""The networks: the lab's architectures (`networks`), its weight files and the shipped models (`weights`), the one
model type every stage accepts (`models`: `ModelInfo`), a user's ONNX model (`checks`, `probe`, `contract`,
`wrapper`, and `usermodel`, its registry), centred I/O of a user's graph (`centring`), torch -> ONNX (`export`) and
ONNX -> torch (`onnxtorch`). Imports the top-level modules and `sr.quant` (a user's model reports the ops no INT8
scheme quantizes)."""
from .. import _public_of

__all__, __getattr__ = _public_of(__name__)  # its public calls, each imported when first asked for
