"""What the lab measures and ships: evaluation (`evaluate`), the side-by-side comparison (`compare`), the
diagnosis (`diagnose`, its `scorer`, the `fixes` it leads to, range `coverage`), the deployment bundle (`bundle`),
the INT8-ready search (`ready`), the figures (`plots`) and the benchmark (`bench`). Imports every layer below it."""
from .. import _public_of

__all__, __getattr__ = _public_of(__name__)  # its public calls, each imported when first asked for
