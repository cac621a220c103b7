"""The example ONNX models in examples/ (what the README's "your own model" commands use): stand-ins of other
model families, built by tests/standins.py and exported to ONNX by torch.

    python scripts/make_examples.py          # writes examples/fsrcnn-y.onnx and examples/xlsr-nhwc.onnx
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import standins  # noqa: E402

KEPT = {"fsrcnn-y": "fsrcnn-y.onnx", "xlsr-nhwc": "xlsr-nhwc.onnx"}


def main() -> None:
    out = ROOT / "examples"
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        built = standins.build_all(Path(work))
        for name, file in KEPT.items():
            shutil.copyfile(built[name], out / file)
            print(f"wrote {out / file} ({(out / file).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
