"""`keel demo --quick` on an idle CPU and on one a competing load keeps busy.

The load is one busy-loop process per usable CPU, started before the demo and stopped after it:
the shape of a machine other people's jobs share. Each case runs the real command line in its own
process with keel's defaults (OpenMP threads sleep while they wait, as many threads as usable
CPUs); `--variants` adds the same demo with the user overriding them (OMP_WAIT_POLICY=ACTIVE,
OMP_NUM_THREADS=1). Prints a table and, last, a JSON line.

    .venv/bin/python benchmarks/demo_under_load.py [--variants keel,active,one-thread] [--full]

The idle case is only idle if nothing else runs: the JSON line records the load average before
each case, so a number taken on a shared machine says so.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> environment the user set
    "keel": {},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
}


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_demo(env_extra: dict, quick: bool, out: Path) -> dict:
    """One `keel demo` in a fresh process; its wall time and the pass@1 it printed."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "keel", "demo", "--out", str(out), *(["--quick"] if quick else [])],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"keel demo failed ({r.returncode}):\n{r.stderr[-2000:]}")
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 1), "sft_pass@1": printed["sft"]["pass@1"], "rl_pass@1": printed["rl"]["pass@1"],
            "load_before": round(load, 2)}


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(variants: list[str], quick: bool) -> dict:
    cpus = usable_cpus()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in variants:
            results[f"{name}, idle"] = run_demo(VARIANTS[name], quick, Path(tmp) / f"{name}-idle")
            load = busy_loops(cpus)
            try:
                time.sleep(1.0)  # let the busy loops take their cores
                results[f"{name}, {cpus} busy loops"] = run_demo(VARIANTS[name], quick, Path(tmp) / f"{name}-busy")
            finally:
                for p in load:
                    p.kill()
                    p.wait()
    print(f"keel demo{' --quick' if quick else ''}, {cpus} usable CPUs")
    print(f"{'case':<28} {'wall s':>8} {'SFT pass@1':>11} {'RL pass@1':>10} {'load before':>12}")
    for case, r in results.items():
        print(f"{case:<28} {r['wall_s']:>8.1f} {r['sft_pass@1']:>11.3f} {r['rl_pass@1']:>10.3f} {r['load_before']:>12.2f}")
    for name in variants:
        idle, busy = results[f"{name}, idle"], results[f"{name}, {cpus} busy loops"]
        print(f"{name}: {busy['wall_s'] / idle['wall_s']:.2f}x slower under the load")
    summary = {"benchmark": "demo_under_load", "quick": quick, "cpus": cpus, "results": results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="keel", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--full", action="store_true", help="the full demo instead of --quick")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: use {', '.join(VARIANTS)}")
    main(names, quick=not args.full)
