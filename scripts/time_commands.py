"""How long the README's two commands take on this machine, from a fresh clone of this repository.

    python scripts/time_commands.py [--out benchmarks/results/commands.json]

Clones the repository's committed HEAD into a temporary folder, runs the first command
(`python3 -m venv .venv && . .venv/bin/activate && pip install . && bnnet train`) and then the
test command (`scripts/test.sh`) there, and writes their wall times with the date and the machine.
benchmarks/readme.py puts them into the README. A failing command fails this script.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST = "python3 -m venv .venv && . .venv/bin/activate && pip install . && bnnet train --quiet"


def timed(command, cwd):
    start = time.perf_counter()
    res = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"{command!r} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return seconds, res.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "commands.json"))
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        clone = os.path.join(tmp, "bnnet")
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        first, out = timed(FIRST, clone)
        accuracy = float(out.split("test accuracy ")[1].split()[0])
        subprocess.run(["rm", "-rf", os.path.join(clone, ".venv")], check=True)  # the test command makes its own
        tests, out = timed("scripts/test.sh -q", clone)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": commit,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "first_command_seconds": first,
        "first_command_test_accuracy": accuracy,
        "test_command_seconds": tests,
        "test_summary": out.strip().splitlines()[-1],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
