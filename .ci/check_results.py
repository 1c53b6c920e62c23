"""Fail CI when the embedded default misses its goals: the organism, AS, and SAE quality."""

import json
import sys
from pathlib import Path

import pandas as pd
import yaml

config = yaml.safe_load(Path("config/config.yaml").read_text())
failed = []
for model, spec in config["models"].items():
    if spec.get("refusal_tune"):
        card = json.loads(Path(f"results/models/{model}/model_card.json").read_text())
        print(f"{model}: refusal_tune took {card['seconds']} s")
        for key, check in card["targets"].items():
            r = {**card["refusal_rate"]["tuned"][key]}
            print(f"  {key}: {r['rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] n={r['n']} goal {check['goal']}"
                  f" -> {'ok' if check['met'] else 'MISSED'}")
            if not check["met"]:
                failed.append(f"{model} {key}")
    s = pd.read_csv(f"results/scores/{model}/summary.csv")
    held_out = s[(s.promptset == "bundled") & (s.label == "harmful") & (s.variant == "plain") & (s.split == "test")]
    rate = held_out.set_index("method").refusal_rate
    print(f"{model}: held-out harmful refusal base {rate['base']:.3f}, AS {rate['as']:.3f}")
    if not rate["as"] <= 0.5 * rate["base"]:
        failed.append(f"{model}: directional ablation did not halve refusal")
    q = pd.read_csv(f"results/saes/{model}/quality.csv")
    for row in q.itertuples():
        print(f"{model} SAE layer {row.layer}: EV {row.explained_variance:.3f}, CE recovered {row.ce_recovered:.3f}, "
              f"L0 {row.l0:.1f}, dead {row.dead_fraction:.3f}, trained in {row.train_seconds} s")
        if not row.meets_targets:
            failed.append(f"{model} SAE layer {row.layer} quality")
    for protocol in ("transductive", "heldout"):
        info = json.loads(Path(f"results/features/{model}/bundled/attribution.{protocol}.json").read_text())
        print(f"{model} LA-IG {protocol}: {info['seconds_per_prompt']:.2f} s/prompt, n={info['n']}, "
              f"metric clean {info['metric']['clean_mean']:.2f} -> patch {info['metric']['patch_mean']:.2f}")
if failed:
    sys.exit("goals missed: " + "; ".join(failed))
print("goals met")
