"""Planning time: `snakemake -n` over the full DAG of a two-model cluster config.

Plans config/paper.yaml (Gemma-2-2B-it and Llama-3.1-8B-Instruct, 337 jobs) with
--profile profiles/slurm in an empty directory, offline: every job's inputs, params and
resources are resolved, as on a cluster's first run. Goal: 5 s or less.
"""

import os
import re
import subprocess
import sys
import tempfile
import time

from common import ROOT, parser, ratio


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "config/paper.yaml"))
    args = p.parse_args()
    repeats = 1 if args.smoke else args.repeats
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    times = []
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "workflow/Snakefile"), "--directory", work,
               "--profile", "profiles/slurm", "--configfile", args.config, "--replace-workflow-config"]
        for _ in range(repeats):
            start = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            times.append(time.perf_counter() - start)
            if res.returncode:
                sys.exit(res.stdout[-2000:] + res.stderr[-2000:])
    jobs = re.search(r"^total\s+(\d+)", res.stdout, re.M)
    best = min(times)
    print(f"snakemake -n, {args.config}: {jobs.group(1) if jobs else '?'} jobs, best of {repeats}: {best:.2f} s "
          f"(all: {', '.join(f'{t:.2f}' for t in times)})")
    ratio("planning time / 5 s", best / 5.0, "goal <= 1")


if __name__ == "__main__":
    main()
