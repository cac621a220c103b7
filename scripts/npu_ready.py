"""`int8-ready --scheme npu` on every shipped model and every family stand-in (tests/standins.py, trained 300
steps on T91): the route it took, the model it chose, the loss against the original FP32 model on Set5 (where
it searched) and on Set14 (the chosen model checked on images it never saw), and the seconds it took, against
the target of 0.05 dB in a 10-minute budget. Every figure is the reference's (ONNX Runtime's CPU kernels) on the
`npu` model (LiteRT's 8-bit specification). Each row is saved as soon as it is measured (docs/npu_ready.json);
the table between the `npuready` markers in docs/how-int8-is-made.md is rewritten after each.

    python scripts/npu_ready.py --data ../shared/data                 # up to 10 minutes a model on 2 CPU cores
    python scripts/npu_ready.py --data ../shared/data --only xlsr-clip rlfn
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import standins  # noqa: E402
from sr.model.weights import shipped_models  # noqa: E402
from sr.quant.quantspec import Scheme  # noqa: E402
from sr.lab.ready import ReadyConfig, loss_on, make_ready  # noqa: E402
from sr.run.runtime import cpu_name  # noqa: E402
from sr.store import write_atomic  # noqa: E402
from sr.run.register import register_onnx  # noqa: E402

SAVED = ROOT / "docs" / "npu_ready.json"
PAGE = ROOT / "docs" / "how-int8-is-made.md"
START, END = "<!-- npuready:start -->", "<!-- npuready:end -->"


def row(name: str, data: Path, budget: float, folder: Path) -> dict:
    """One model through make_ready (the CLI's int8-ready) with the npu scheme, and its choice on Set14."""
    model = name if name in shipped_models() else register_onnx(
        standins.family(name, folder, str(data / "T91"))).name
    started = time.perf_counter()
    result = make_ready(ReadyConfig(model, data=str(data / "Set5"), target_db=0.05, budget_minutes=budget,
                                    scheme=Scheme.NPU),
                        progress=lambda f, m: print(f"  {name} [{100 * f:3.0f}%] {m}", flush=True))
    set14 = loss_on(result.chosen, str(data / "Set14"))
    return {"name": name, "kind": "shipped" if model == name else "family", "ready": result.to_json(),
            "ready_seconds": round(time.perf_counter() - started, 1), "set14_loss_db": set14[0],
            "set14_brightness": set14[1], "budget_minutes": budget, "cpu": cpu_name(),
            "load_average": round(os.getloadavg()[0], 2)}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | route | chosen | loss Set5 / Set14 (dB) | met | seconds (load) |", "|---|---|---|---|---|---|"]
    for r in rows:
        ready = r["ready"]
        route = " -> ".join(s["route"] for s in ready["route"])
        curve = "" if ready["met"] else "; best so far: " + ", ".join(
            f"{p['best_loss_db']:.3f} at {p['seconds']:.0f} s" for p in ready["curve"][-3:])
        lines.append(f"| {r['name']} ({r['kind']}) | {route} | {ready['chosen']['what']} | "
                     f"{ready['loss_db_vs_original']:.3f} / {r['set14_loss_db']:.3f} | "
                     f"{'yes' if ready['met'] else 'no' + curve} | {ready['seconds']:.0f} ({r['load_average']}) |")
    return "\n".join(lines)


def write(rows: list[dict]) -> None:
    write_atomic(json.dumps(rows, indent=1).encode(), SAVED)
    cpus = sorted({r["cpu"] for r in rows})
    table = (f"{START}\nMeasured on {', '.join(cpus)}, `int8-ready --scheme npu --target-db 0.05 --budget-minutes "
             f"{rows[0]['budget_minutes']:g}` on Set5 (the load average when each row ended in brackets: 2 cores)."
             f"\n\n{markdown(rows)}\n{END}")
    text = PAGE.read_text()
    PAGE.write_text(re.sub(f"{START}.*?{END}", lambda _: table, text, flags=re.S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--only", nargs="+", default=shipped_models() + standins.FAMILY_NAMES)
    args = parser.parse_args()
    order = shipped_models() + standins.FAMILY_NAMES
    if unknown := sorted(set(args.only) - set(order)):
        parser.error(f"unknown model(s): {', '.join(unknown)}; choose from {', '.join(order)}")
    rows = {r["name"]: r for r in (json.loads(SAVED.read_text()) if SAVED.is_file() else [])}  # --only: rest kept
    folder = Path(tempfile.mkdtemp())
    for name in args.only:
        rows[name] = row(name, Path(args.data), args.budget_minutes, folder)
        write([rows[n] for n in order if n in rows])
        print(markdown([rows[name]]).splitlines()[-1], flush=True)
    print(f"wrote {SAVED.relative_to(ROOT)} and the table in {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
