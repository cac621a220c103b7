"""The table of the model families people ship (tests/standins.py `FAMILY_NAMES`, each trained 300 steps on T91):
its detected contract, the default INT8 (the CLI's `--method auto`) loss and brightness on Set5, and what
`int8-ready --data Set5 --target-db 0.05` did (route, loss, seconds), with the chosen model checked on Set14.
Writes docs/families.json and the tables between the `families` markers in README.md and docs/your-model.md.

    python scripts/families_table.py --data ../shared/data --budget-minutes 10
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import standins  # noqa: E402
from sr.quant.calibrate import CalibrationConfig  # noqa: E402
from sr.lab.evaluate import EvalConfig, evaluate  # noqa: E402
from sr.lab.ready import ReadyConfig, loss_on, make_ready  # noqa: E402
from sr.store import write_atomic  # noqa: E402
from sr.run.register import register_onnx  # noqa: E402


def row(name: str, data: Path, budget: float, folder: Path) -> dict:
    path = standins.family(name, folder, str(data / "T91"))
    user = register_onnx(path)
    c = user.contract
    contract = f"{c.layout.value}, {c.color.value}, x{c.scale}" + (", pre-upsampled" if c.pre_upsampled else "")
    default = evaluate(EvalConfig(model=user.name, data=str(data / "Set5"), engine="ort-int8",
                                  calibration=CalibrationConfig(method="auto")))  # the CLI's default
    started = time.perf_counter()
    result = make_ready(ReadyConfig(user.name, data=str(data / "Set5"), target_db=0.05, budget_minutes=budget),
                        progress=lambda f, m: print(f"  {name} [{100 * f:3.0f}%] {m}", flush=True))
    set14 = loss_on(result.chosen, str(data / "Set14"))
    return {"name": name, "contract": contract, "default_method": default["method"],
            "default_loss_db": default["fp32_mean"]["psnr_y"] - default["int8_mean"]["psnr_y"],
            "default_brightness": default["brightness_ratio"], "default_warnings": default["warnings"],
            "ready": result.to_json(), "ready_seconds": time.perf_counter() - started,
            "set14_loss_db": set14[0], "set14_brightness": set14[1]}


def markdown(rows: list[dict]) -> str:
    lines = ["| family (stand-in) | contract | default INT8 loss, Set5 (brightness) | int8-ready route | "
             "loss Set5 / Set14 | seconds | curve (where the target was not met) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ready = r["ready"]
        route = " -> ".join(s["route"] for s in ready["route"])
        warned = " warned" if r["default_warnings"] else ""
        lines.append(f"| {r['name']} | {r['contract']} | {r['default_method']}: {r['default_loss_db']:.3f} dB "
                     f"({r['default_brightness']:.3f}){warned} | {route}: {ready['chosen']['what']} | "
                     f"{ready['loss_db_vs_original']:.3f} / {r['set14_loss_db']:.3f} | {ready['seconds']:.0f} |"
                     + (" |" if ready["met"] else " not met; best loss so far: " + ", ".join(
                         f"{p['best_loss_db']:.2f} at {p['seconds']:.0f} s" for p in ready["curve"]) + " |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--only", nargs="+", default=standins.FAMILY_NAMES)
    args = parser.parse_args()
    folder, saved = Path(tempfile.mkdtemp()), ROOT / "docs" / "families.json"
    rows = {r["name"]: r for r in (json.loads(saved.read_text()) if saved.is_file() else [])}  # --only: the rest kept
    for name in args.only:
        rows[name] = row(name, Path(args.data), args.budget_minutes, folder)
        rows[name]["budget_minutes"] = args.budget_minutes
        print(markdown([rows[name]]).splitlines()[-1], flush=True)
    rows = [rows[name] for name in standins.FAMILY_NAMES if name in rows]
    write_atomic(json.dumps(rows, indent=1).encode(), saved)
    table = "<!-- families:start -->\n" + markdown(rows) + "\n<!-- families:end -->"
    for page in (ROOT / "README.md", ROOT / "docs" / "your-model.md"):
        text = page.read_text()
        page.write_text(re.sub(r"<!-- families:start -->.*?<!-- families:end -->", lambda _: table, text, flags=re.S))
    print("wrote docs/families.json and the families tables")


if __name__ == "__main__":
    main()
