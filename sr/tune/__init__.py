"""Changing a model's weights for INT8: the one training loop (`loop`), training and distillation (`train`,
`distill`), the fake-quantized graph (`fakequant`), the post-training refinements and their transforms (`ptq`,
`transforms`), and QAT (`qat`). Imports the top-level modules, `sr.quant`, `sr.model` and `sr.run`."""
from .. import _public_of

__all__, __getattr__ = _public_of(__name__)  # its public calls, each imported when first asked for
