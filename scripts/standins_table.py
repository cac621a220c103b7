"""The table in docs/your-model.md of stand-in ONNX models: each built by tests/standins.py, its detected contract, and its
FP32 / INT8 Set5 figures (auto, the CLI's default, with the method it chose; minmax; entropy; 20 samples, tensorrt
scheme).

    python scripts/standins_table.py --data ../shared/data
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import standins  # noqa: E402
from sr.quant.calibrate import CalibrationConfig  # noqa: E402
from sr.lab.evaluate import EvalConfig, evaluate  # noqa: E402
from sr.model.contract import Overrides  # noqa: E402
from sr.run.register import register_onnx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    lines = ["| stand-in | detected contract | left in float | FP32 | INT8 auto: chosen (brightness) | "
             "INT8 minmax (brightness) | INT8 entropy (brightness) |", "|---|---|---|---|---|---|---|"]
    for name, path in standins.build_all(Path(tempfile.mkdtemp())).items():
        user = register_onnx(path, Overrides(scale=3) if "vdsr" in name else Overrides())
        c = user.contract
        contract = (f"{c.layout.value}, {c.color.value}, [0, {c.value_range}], x{c.scale}"
                    + (", pre-upsampled" if c.pre_upsampled else "") + (f", fixed {c.fixed_size}" if c.fixed_size else ""))
        cells = []
        for method in ("auto", "minmax", "entropy"):
            report = evaluate(EvalConfig(model=user.name, data=f"{args.data}/Set5", engine="ort-int8",
                                         calibration=CalibrationConfig(method=method, samples=20)))
            chosen = f"{report['method']}: " if method == "auto" else ""
            cells.append(f"{chosen}{report['int8_mean']['psnr_y']:.2f} ({report['brightness_ratio']:.3f})")
        lines.append(f"| `{name}` | {contract} | {', '.join(user.float_ops) or '-'} | "
                     f"{report['fp32_mean']['psnr_y']:.2f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    readme = ROOT / "docs" / "your-model.md"
    text = readme.read_text()
    table = "<!-- standins:start -->\n" + "\n".join(lines) + "\n<!-- standins:end -->"
    readme.write_text(re.sub(r"<!-- standins:start -->.*?<!-- standins:end -->", lambda _: table, text, flags=re.S))
    print(f"rewrote the stand-ins table in {readme}")


if __name__ == "__main__":
    main()
