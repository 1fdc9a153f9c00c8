"""Chaos on lab hosts: network partitions, node kills and pauses, nats-server restarts, under a
writer on every host (tests/lab_chaos.py has the runs and the oracle).

    sudo .venv/bin/python bench/chaos_lab.py --runs 10 --seed 600 --duration 35 --json lab-runs.jsonl

Brings the lab of vagrant/cluster.yaml up (root; docs/deploy.md, "The lab"), deploys it with
ansible/site.yml, runs the seeds S..S+N-1 one after another on that cluster, and takes the lab
down again, whatever happened. Each run prints its faults and outcome; the exit status is 1 if
any run failed. docs/reliability.md records a campaign.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.lab_chaos import LabRunResult, prepare_items_table, run_lab_chaos  # noqa: E402
from tests.test_lab_deploy import SPEC, lab_for  # noqa: E402


class _Scratch:
    """What lab_for wants of pytest's tmp_path_factory: fresh directories, removed at the end."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="marmot-chaos-lab-"))

    def mktemp(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))
        return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Randomized fault runs on lab hosts, then an oracle.")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of faults and writes per run")
    parser.add_argument("--json", type=Path, help="append one JSON line per run to this file")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.duration < 10:
        parser.error("--runs must be at least 1 and --duration at least 10 seconds")
    scratch = _Scratch()
    labs = lab_for(SPEC, scratch)
    failed = 0
    try:
        lab = next(labs)
        print(f"chaos-lab: deploying {SPEC.name} with site.yml", flush=True)
        lab.playbook(SPEC)
        prepare_items_table(lab)
        for i in range(args.runs):
            seed = args.seed + i
            print(f"run {i + 1}/{args.runs}: seed {seed}, {args.duration:.0f}s", flush=True)
            try:
                result = run_lab_chaos(lab, SPEC, seed, args.duration, say=lambda line: print(line, flush=True))
            except (AssertionError, subprocess.SubprocessError, OSError) as exc:  # a host command failed
                result = LabRunResult(seed, args.duration, problems=[f"the run could not go on: {exc}"[:3000]])
            failed += not result.ok
            outcome = "PASS" if result.ok else "FAIL"
            print(f"  -> {outcome}: {result.operations} operations, {len(result.faults)} faults, converged "
                  f"{result.converge_s}s after healing, verify {result.verify}, {result.wall_s:.0f}s wall", flush=True)
            for problem in result.problems:
                print(f"  problem: {problem[:3000]}", flush=True)
            if args.json:
                with args.json.open("a") as out:
                    out.write(json.dumps(result.as_json()) + "\n")
    finally:
        labs.close()  # lab down, whatever happened
        shutil.rmtree(scratch.root, ignore_errors=True)
    print(f"chaos-lab: {args.runs - failed}/{args.runs} runs passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
