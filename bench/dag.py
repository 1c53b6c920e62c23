"""The embedded default end to end: wall time and a per-rule breakdown from Snakemake's benchmarks.

Reads a finished run's directory: ``benchmarks/<rule>/...tsv`` (Snakemake's ``benchmark:`` files:
seconds, max RSS) and the run's ``.snakemake/log`` (first and last timestamps = wall time).
Run it after ``snakemake --cores 2`` from empty results. Goal: 15 minutes or less.
"""

import re
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from common import ROOT, parser, ratio


def wall_seconds(log: Path) -> float:
    stamps = [datetime.strptime(m, "%a %b %d %H:%M:%S %Y")
              for m in re.findall(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]", log.read_text(), re.M)]
    return (max(stamps) - min(stamps)).total_seconds() if stamps else float("nan")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=ROOT)
    p.add_argument("--log", type=Path, default=None, help="the run's Snakemake log (default: the newest)")
    args = p.parse_args()
    rules = defaultdict(lambda: [0, 0.0, 0.0])
    for tsv in sorted((args.workdir / "benchmarks").rglob("*.tsv")):
        rule = tsv.relative_to(args.workdir / "benchmarks").parts[0].removesuffix(".tsv")
        lines = tsv.read_text().splitlines()
        if len(lines) < 2:
            continue
        head, values = lines[0].split("\t"), lines[-1].split("\t")
        row = dict(zip(head, values))
        rules[rule][0] += 1
        rules[rule][1] += float(row["s"])
        rules[rule][2] = max(rules[rule][2], float(row["max_rss"]) if row["max_rss"] not in ("-", "NA") else 0.0)
    if not rules:
        if args.smoke:
            ratio("wall / 15 min", 0.0, "no finished run here (smoke mode); goal <= 1")
            return
        raise SystemExit(f"no benchmarks under {args.workdir}/benchmarks: run the DAG first")
    logs = sorted((args.workdir / ".snakemake/log").glob("*.snakemake.log"))
    log = args.log or (logs[-1] if logs else None)
    wall = wall_seconds(log) if log else float("nan")
    total = sum(v[1] for v in rules.values())
    print("| rule | jobs | seconds | share | max RSS (MB) |\n|---|---:|---:|---:|---:|")
    for rule, (n, secs, rss) in sorted(rules.items(), key=lambda kv: -kv[1][1]):
        print(f"| {rule} | {n} | {secs:,.0f} | {secs / total:.0%} | {rss:,.0f} |")
    print(f"| all | {sum(v[0] for v in rules.values())} | {total:,.0f} | 100% | |")
    print(f"wall time (first to last job stamp of {log.name if log else '?'}): {wall / 60:.1f} min; "
          f"sum of job times {total / 60:.1f} min")
    ratio("wall / 15 min", wall / 900, "goal <= 1")


if __name__ == "__main__":
    main()
