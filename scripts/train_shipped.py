"""Train the five shipped x3 models (teacher, xlsr-relu, xlsr-clip and their distilled twins) in a time budget.

Phase 0 measures the steps/s of every job running side by side (the real contention), phase 1 trains the
teacher and the two plain XLSRs together, phase 2 distils the two KD students from the new teacher. The four
XLSRs get the same recipe and step count, so every twin comparison is fair. Every command is the public CLI;
`commands.json` in the output folder records each one exactly as run.

    python scripts/train_shipped.py --data ../shared/data --out weights --phase-seconds 210
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

XLSR = ["--arch", "xlsr", "--batch-size", "32", "--lr-patch", "32", "--max-lr", "2e-3", "--val-every", "2000",
        "--checkpoint-every", "5000"]
TEACHER = ["--arch", "teacher", "--amp", "--batch-size", "32", "--lr-patch", "48", "--max-lr", "4e-4",
           "--val-every", "2000", "--checkpoint-every", "5000"]


def launch(name: str, args: list[str], logs: Path, threads: int) -> tuple[subprocess.Popen, list[str]]:
    command = [sys.executable, "-m", "sr", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    log = open(logs / f"{name}.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), command


def finish(jobs: dict, logs: Path) -> dict[str, tuple[int, float]]:
    """Wait for every job; (steps, seconds) each, from the CLI's last line."""
    done = {}
    for name, (process, _) in jobs.items():
        if process.wait() != 0:
            raise SystemExit(f"{name} failed; see {logs / (name + '.log')}:\n" + (logs / f"{name}.log").read_text()[-3000:])
        match = re.search(r"after (\d+) steps in (\d+) s", (logs / f"{name}.log").read_text())
        done[name] = (int(match.group(1)), max(float(match.group(2)), 1.0))
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="weights")
    parser.add_argument("--phase-seconds", type=float, default=210.0)
    parser.add_argument("--probe-seconds", type=float, default=20.0)
    parser.add_argument("--copy-to", default=os.environ.get("OUT"), help="also copy each result here")
    args = parser.parse_args()
    if args.copy_to:
        Path(args.copy_to).mkdir(parents=True, exist_ok=True)
    out, data = Path(args.out), Path(args.data)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--train-dirs", str(data / "T91"), str(data / "BSD200"), "--val-dir", str(data / "Set5"), "--scale", "3"]
    record: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "phases": {}}

    # Phase 0: probe the rates with all five kinds of job running at once (a random teacher stands in).
    probe = out / "probe"
    probe.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-c", "from sr.models import build_model, save_weights; "
                    f"save_weights(build_model('teacher'), '{probe / 'teacher.safetensors'}')"], check=True)
    huge = ["--steps", "1000000", "--max-seconds", str(args.probe_seconds), "--val-dir", ""]
    jobs = {
        "probe-teacher": launch("probe-teacher", ["train", *TEACHER, *common, *huge, "--out", str(probe / "t.safetensors")], logs, 4),
        "probe-xlsr": launch("probe-xlsr", ["train", *XLSR, *common, *huge, "--out", str(probe / "x.safetensors")], logs, 3),
        "probe-kd": launch("probe-kd", ["distill", *XLSR, *common, *huge, "--teacher", str(probe / "teacher.safetensors"),
                                        "--out", str(probe / "k.safetensors")], logs, 3),
    }
    rates = {name: steps / seconds for name, (steps, seconds) in finish(jobs, logs).items()}
    shutil.rmtree(probe)
    teacher_steps = int(rates["probe-teacher"] * args.phase_seconds) // 100 * 100 or 100
    xlsr_steps = int(min(rates["probe-xlsr"], rates["probe-kd"]) * args.phase_seconds) // 100 * 100 or 100
    record.update(rates=rates, teacher_steps=teacher_steps, xlsr_steps=xlsr_steps)
    print(json.dumps(record), flush=True)

    def run_phase(phase: str, specs: dict[str, list[str]], threads: int) -> None:
        started = time.time()
        jobs = {name: launch(name, cmd, logs, threads) for name, cmd in specs.items()}
        results = finish(jobs, logs)
        record["phases"][phase] = {"seconds": round(time.time() - started, 1), "jobs": {
            name: {"command": "python -m sr " + " ".join(jobs[name][1][3:]), "steps": results[name][0],
                   "loop_seconds": results[name][1]} for name in specs}}
        for name in specs:
            if args.copy_to:
                shutil.copy(out / f"{name}.safetensors", Path(args.copy_to) / f"{name}.safetensors")
        (out / "commands.json").write_text(json.dumps(record, indent=2))
        print(json.dumps(record["phases"][phase]), flush=True)

    xlsr_steps_args = ["--steps", str(xlsr_steps)]
    run_phase("1", {
        "teacher": ["train", *TEACHER, *common, "--steps", str(teacher_steps), "--out", str(out / "teacher.safetensors")],
        "xlsr-relu": ["train", *XLSR, *common, *xlsr_steps_args, "--final-activation", "relu",
                      "--out", str(out / "xlsr-relu.safetensors")],
        "xlsr-clip": ["train", *XLSR, *common, *xlsr_steps_args, "--final-activation", "clipped_relu",
                      "--out", str(out / "xlsr-clip.safetensors")],
    }, threads=4)
    run_phase("2", {
        "xlsr-relu-kd": ["distill", *XLSR, *common, *xlsr_steps_args, "--final-activation", "relu",
                         "--teacher", str(out / "teacher.safetensors"), "--out", str(out / "xlsr-relu-kd.safetensors")],
        "xlsr-clip-kd": ["distill", *XLSR, *common, *xlsr_steps_args, "--final-activation", "clipped_relu",
                         "--teacher", str(out / "teacher.safetensors"), "--out", str(out / "xlsr-clip-kd.safetensors")],
    }, threads=6)
    if args.copy_to:
        shutil.copy(out / "commands.json", Path(args.copy_to) / "commands.json")
        shutil.make_archive(str(Path(args.copy_to) / "logs"), "gztar", logs)


if __name__ == "__main__":
    main()
