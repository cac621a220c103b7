"""Stage 1 of the five shipped x3 models (teacher, xlsr-relu, xlsr-clip and their distilled twins), in a time budget.

Phase 0 measures the steps/s of every job running side by side (the real contention), phase 1 trains the
teacher and the two plain XLSRs together, phase 2 distils the two KD students from the new teacher. The four
XLSRs get the same recipe and step count, so every twin comparison is fair. Every command is the public CLI;
`commands.json` in the output folder records each one exactly as run, and `logs/` holds each job's output.

Stage 2 (`scripts/finetune_stage2.sh`) fine-tunes the four XLSRs from these stage-1 weights. The whole recipe of
the shipped files, with the exact commands, step counts and results, is in weights/README.md:

    python scripts/train_shipped.py --data ../shared/data --out weights --phase-seconds 210
    bash scripts/finetune_stage2.sh ../shared/data weights
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
    """Start `python -m sr ARGS` with its output in `logs/<name>.log`; returns (process, command)."""
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


def probe_rates(out: Path, logs: Path, common: list[str], probe_seconds: float) -> dict[str, float]:
    """Phase 0: steps/s of each kind of job, all running at once (a random teacher stands in for the KD jobs)."""
    probe = out / "probe"
    probe.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-c", "from sr.model.networks import build_model; from sr.model.weights import save_weights; "
                    f"save_weights(build_model('teacher'), '{probe / 'teacher.safetensors'}')"], check=True)
    huge = ["--steps", "1000000", "--max-seconds", str(probe_seconds), "--val-dir", ""]
    jobs = {
        "probe-teacher": launch("probe-teacher", ["train", *TEACHER, *common, *huge, "--out", str(probe / "t.safetensors")], logs, 4),
        "probe-xlsr": launch("probe-xlsr", ["train", *XLSR, *common, *huge, "--out", str(probe / "x.safetensors")], logs, 3),
        "probe-kd": launch("probe-kd", ["distill", *XLSR, *common, *huge, "--teacher", str(probe / "teacher.safetensors"),
                                        "--out", str(probe / "k.safetensors")], logs, 3),
    }
    rates = {name: steps / seconds for name, (steps, seconds) in finish(jobs, logs).items()}
    shutil.rmtree(probe)
    return rates


def run_phase(phase: str, specs: dict[str, list[str]], threads: int, out: Path, logs: Path, record: dict) -> None:
    """Run the jobs of one phase side by side, then add them to `record` and rewrite `commands.json`."""
    started = time.time()
    jobs = {name: launch(name, command, logs, threads) for name, command in specs.items()}
    results = finish(jobs, logs)
    record["phases"][phase] = {"seconds": round(time.time() - started, 1), "jobs": {
        name: {"command": "python -m sr " + " ".join(jobs[name][1][3:]), "steps": results[name][0],
               "loop_seconds": results[name][1]} for name in specs}}
    (out / "commands.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record["phases"][phase]), flush=True)


def phase_jobs(out: Path, common: list[str], teacher_steps: int, xlsr_steps: int) -> tuple[dict, dict]:
    """The commands of phase 1 (teacher, xlsr-relu, xlsr-clip) and phase 2 (the two KD students)."""
    steps = ["--steps", str(xlsr_steps)]
    teacher = str(out / "teacher.safetensors")
    phase1 = {
        "teacher": ["train", *TEACHER, *common, "--steps", str(teacher_steps), "--out", teacher],
        "xlsr-relu": ["train", *XLSR, *common, *steps, "--final-activation", "relu",
                      "--out", str(out / "xlsr-relu.safetensors")],
        "xlsr-clip": ["train", *XLSR, *common, *steps, "--final-activation", "clipped_relu",
                      "--out", str(out / "xlsr-clip.safetensors")],
    }
    phase2 = {
        "xlsr-relu-kd": ["distill", *XLSR, *common, *steps, "--final-activation", "relu",
                         "--teacher", teacher, "--out", str(out / "xlsr-relu-kd.safetensors")],
        "xlsr-clip-kd": ["distill", *XLSR, *common, *steps, "--final-activation", "clipped_relu",
                         "--teacher", teacher, "--out", str(out / "xlsr-clip-kd.safetensors")],
    }
    return phase1, phase2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="folder holding T91/, BSD200/ and Set5/")
    parser.add_argument("--out", default="weights")
    parser.add_argument("--phase-seconds", type=float, default=210.0, help="time budget of each phase")
    parser.add_argument("--probe-seconds", type=float, default=20.0)
    args = parser.parse_args()
    out, data = Path(args.out), Path(args.data)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--train-dirs", str(data / "T91"), str(data / "BSD200"), "--val-dir", str(data / "Set5"), "--scale", "3"]
    record: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "phases": {}}

    rates = probe_rates(out, logs, common, args.probe_seconds)
    teacher_steps = int(rates["probe-teacher"] * args.phase_seconds) // 100 * 100 or 100
    xlsr_steps = int(min(rates["probe-xlsr"], rates["probe-kd"]) * args.phase_seconds) // 100 * 100 or 100
    record.update(rates=rates, teacher_steps=teacher_steps, xlsr_steps=xlsr_steps)
    print(json.dumps(record), flush=True)

    phase1, phase2 = phase_jobs(out, common, teacher_steps, xlsr_steps)
    run_phase("1", phase1, threads=4, out=out, logs=logs, record=record)
    run_phase("2", phase2, threads=6, out=out, logs=logs, record=record)


if __name__ == "__main__":
    main()
