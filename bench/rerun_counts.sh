#!/usr/bin/env bash
# Jobs a dry run of the default config plans after each of four edits, at COMMIT (issue 27):
# every planned output is created empty and `snakemake --touch` records its metadata, so the
# counts are what a finished run would rerun. Each commit is checked out in its own worktree.
# usage: bash bench/rerun_counts.sh COMMIT NAME   (e.g. 019d9e7 before; HEAD after)
set -euo pipefail
commit=$1; name=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
wt=/tmp/m-$name; work=/tmp/m-$name-work
rm -rf $work; git -C "$repo" worktree remove --force $wt 2>/dev/null || true
git -C "$repo" worktree add -q --detach $wt $commit
export PYTHONPATH=$wt/src
cd $wt
SM="$repo/.venv/bin/python -m snakemake -s $wt/workflow/Snakefile --directory $work"
mkdir -p $work
$SM -n --configfile $wt/config/config.yaml > $work.plan 2>/dev/null
"$repo/.venv/bin/python" - $work $work.plan <<'PY'
import re,os,sys
work,plan=sys.argv[1:]
txt=open(plan).read()
outs={o for m in re.finditer(r'^\s+output: (.*)$', txt, re.M) for o in m.group(1).split(', ')}
dirs=re.compile(r'results/categories/[^/]+/circuits$|results/dashboards/[^/]+/pages$|results/models/[^/]+/(base|tuned)$|results/saes/[^/]+/layer_\d+$')
os.chdir(work)
for o in sorted(outs):
    if dirs.search(o): os.makedirs(o, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(o) or '.', exist_ok=True); open(o,'w').close()
PY
$SM --touch --cores 1 --configfile $wt/config/config.yaml > $work.touch 2>&1
total=$(grep -c "^\s*output:" $work.plan)
count() { $SM -n --quiet rules "$@" 2>&1 | awk '$1=="total"{print $2}' ; }
"$repo/.venv/bin/python" - $wt <<'PY'
import yaml,sys
wt=sys.argv[1]
c=yaml.safe_load(open(f'{wt}/config/config.yaml')); c['bootstrap']['n_resamples']//=2
yaml.safe_dump(c,open(f'{wt}/boot.yaml','w'),sort_keys=False)
c=yaml.safe_load(open(f'{wt}/config/config.yaml')); c['features']['k_star']+=5
yaml.safe_dump(c,open(f'{wt}/kstar.yaml','w'),sort_keys=False)
PY
echo "$name: total jobs planned from empty: $total"
echo "$name: unchanged: $(count --configfile $wt/config/config.yaml)"
echo "$name: bootstrap.n_resamples: $(count --configfile $wt/boot.yaml)"
echo "$name: features.k_star: $(count --configfile $wt/kstar.yaml)"
sed -i 's/    needles = \[_normalise(s) for s in substrings\]/    needles = list(map(_normalise, substrings))/' $wt/src/refusal_atlas/evaluation/substring_judge.py
git -C $wt diff --stat
echo "$name: body edit in judges.py: $(count --configfile $wt/config/config.yaml)"
git -C $wt checkout -q src/refusal_atlas/evaluation/substring_judge.py
sed -i '0,/^def /s//# a comment\ndef /' $wt/src/refusal_atlas/core/stats.py
git -C $wt diff --stat
echo "$name: comment edit in stats.py: $(count --configfile $wt/config/config.yaml)"
git -C $wt checkout -q src/refusal_atlas/core/stats.py
git -C "$repo" worktree remove --force $wt
