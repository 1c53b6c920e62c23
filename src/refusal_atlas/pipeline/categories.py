"""Stages of workflow/rules/categories.smk: per-category features and steering, circuits,
modularity.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from refusal_atlas.core.io import atomic_path, table_html, write_json, write_parquet, write_safetensors, write_table
from refusal_atlas.config.resolve import Clamp, read_search
from refusal_atlas.data.prompts import sample_each, sample_rows
from refusal_atlas.features import attribution, direction, selection
from refusal_atlas.features.direction import fit_direction
from refusal_atlas.lm.generation import generate
from refusal_atlas.pipeline.judging import error_set, label_rate, stage_judge
from refusal_atlas.pipeline.openers import open_model, open_saes, open_submodule_saes
from refusal_atlas.reporting import figures
from refusal_atlas.steering import clamp
from refusal_atlas.studies import categories
from refusal_atlas.studies.circuits import (
    Site,
    ablated_metric,
    choose_pools,
    edge_pairs,
    edge_scores,
    faithfulness,
    node_scores,
    reference_means,
)
from refusal_atlas.studies.modularity import (
    SIMILARITIES,
    PermutationConfig,
    Scores,
    circuits_by_group,
    discover,
    pairwise_tests,
    permutation_test,
    similarity_matrix,
    verdict,
)

log = logging.getLogger("refusal_atlas")


# ---------------------------------------------------------------------------- categories
def _category_prompts(df: pd.DataFrame, split: str, min_prompts: int, names: Sequence[str] | None) -> list[str]:
    """The categories studied: as configured, else every category with ``min_prompts`` plain
    harmful prompts in ``split``."""
    harm = df[(df.label == "harmful") & (df.variant == "plain") & (df.split == split)]
    counts = harm.category.value_counts()
    if names:
        short = {c: int(counts.get(c, 0)) for c in names if counts.get(c, 0) < min_prompts}
        if short:
            raise ValueError(f"categories with fewer than {min_prompts} harmful {split} prompts: {short}")
        return sorted(names)
    cats = sorted(counts[counts >= min_prompts].index)
    if len(cats) < 2:
        raise ValueError(f"the promptset has {len(cats)} categories with {min_prompts}+ harmful {split} prompts; "
                         "comparing categories needs two or more")
    return cats


def category_features(*, model_dir: str, spec: Mapping, acts_path: str, index_path: str, direction_summary: str,
                      sae_dirs: Sequence[str], cfg: Mapping, outputs: Mapping[str, str]) -> None:
    """F*_cat per category: r_cat (difference in means, fit split) and LA-IG with it (Yeo et al.
    2025 §4.2); then the common and specific sets of categories.py."""

    info = json.loads(Path(direction_summary).read_text())
    layer_star, refusal_id = info["layer"], info["refusal_token_ids"][0]
    sinks = load_file(info["directions"])["sink_dims"]
    index = pd.read_parquet(index_path)
    acts = load_file(acts_path)["resid_post"]
    cats = _category_prompts(index, cfg["fit_split"], cfg["min_prompts"], cfg["categories"])
    dirs = categories.category_directions(acts, index, cats, cfg["fit_split"], cfg["harmless"], cfg["min_prompts"])
    model, tok, system_prompt = open_model(model_dir, spec)
    device = next(model.parameters()).device
    sae_map = open_saes(sae_dirs, spec, model)
    ig_cfg = attribution.LAIGConfig.from_section(cfg)
    r_all = direction.zero_dims(fit_direction(acts, index, cfg["fit_split"])[0], sinks)[layer_star]
    frames, meta = [], {}
    fit = index[(index.split == cfg["fit_split"]) & (index.label == "harmful") & (index.variant == "plain")]
    for c in cats:
        r = direction.zero_dims(dirs[c], sinks)[layer_star]
        prompts = sample_rows(fit[fit.category == c], cfg["max_prompts"], cfg["seed"])
        attr = attribution.la_ig(model, tok, sae_map, list(prompts.instruction), direction=r.to(device),
                                 refusal_id=refusal_id, cfg=ig_cfg, system_prompt=system_prompt,
                                 desc=f"LA-IG {c}")
        # LA-IG's own selection: top K* by attribution among the K0 latents per layer closest to r_cat
        mask = selection.candidate_mask(selection.decoder_cosines(sae_map, r), cfg["k0"])
        picked = selection.top_features(attr.scores.mean(0), cfg["k_star"], mask)
        frames.append(pd.DataFrame({
            "category": c, "rank": np.arange(1, len(picked) + 1), "layer": [attr.layers[j] for j, _, _ in picked],
            "feature": [i for _, i, _ in picked], "score": [v for _, _, v in picked], "n_prompts": len(prompts)}))
        meta[c] = {"n_prompts": len(prompts),
                   "cos_with_global_r": float(torch.nn.functional.cosine_similarity(r, r_all, dim=0))}
        log.info("%s: %d prompts, cos(r_cat, r) %.3f", c, len(prompts), meta[c]["cos_with_global_r"])
    sets = pd.concat(frames, ignore_index=True)
    common, conds = categories.condition_sets(sets, cfg["common_min_fraction"], cfg["truncate_specific"])
    rows = [df[["layer", "feature"]].assign(category=c, condition=cond, source=src)
            for (c, cond, src), df in conds.items()]
    write_parquet(sets, outputs["features"])
    write_parquet(pd.concat(rows, ignore_index=True), outputs["conditions"])
    summary = pd.DataFrame([{"category": c, "n_prompts": meta[c]["n_prompts"], "k_star": cfg["k_star"],
                             "cos_with_global_r": meta[c]["cos_with_global_r"], "n_common": len(common),
                             "n_specific": len(conds[(c, "specific", c)])} for c in cats])
    write_table(summary, outputs["table"])
    write_json({"layer_star": layer_star, "categories": cats, "common": common.to_dict("records"),
                "common_min_fraction": cfg["common_min_fraction"], "truncated": bool(cfg["truncate_specific"] and len(common)),
                "per_category": meta}, outputs["summary"])


def _condition_feature_set(rows: pd.DataFrame, row_of: Mapping[str, int], n_rows: int, prompt_rows: Mapping[str, str],
                           d_sae: Mapping[int, int]) -> clamp.FeatureSet:
    """A local FeatureSet: row i clamps the features ``rows`` lists for the i-th key of ``row_of``."""
    layers = sorted(set(rows.layer)) or sorted(d_sae)[:1]
    masks = {l: torch.zeros(n_rows, d_sae[l], dtype=torch.bool) for l in layers}
    for key, l, f in zip(rows.key, rows.layer, rows.feature):
        masks[int(l)][row_of[key], int(f)] = True
    scale = {l: torch.ones_like(m, dtype=torch.float32) for l, m in masks.items()}
    return clamp.FeatureSet(masks, scale, {pid: row_of[k] for pid, k in prompt_rows.items()})


def _pinned_rows(conds: pd.DataFrame, condition: str) -> pd.DataFrame | None:
    """What the reference pins to clean values under each clamp (its ``retain_feats``): the common
    set under a specific or transfer clamp, each category's own specific set under the common one."""
    if condition in ("specific", "transfer"):
        return conds[conds.condition == "common"]
    if condition == "common":
        return conds[(conds.condition == "specific") & (conds.source == conds.category)]
    return None


def category_steering(*, model_dir: str, spec: Mapping, promptset: str, conditions: str, sae_dirs: Sequence[str],
                      hparams: str | None, cfg: Mapping, substrings: Sequence[str], boot: Mapping,
                      outputs: Mapping[str, str], caption: str, fourlabel: Mapping | None = None,
                      harmbench: Mapping | None = None) -> None:
    """Jailbreak rate of each category's held-out harmful prompts under the clamps of §4.2, and
    the normalized jailbreak (Yeo et al. 2025 §4.2).

    A jailbreak is the judge's ``compliance``: the four-label judge's where ``fourlabel`` gives
    it (then with the rate corrected for its measured error, and the evasive and degenerate
    shares beside it), the HarmBench classifier's "yes" where ``harmbench`` gives it (the
    reference's judge), else the substring judge's "no refusal phrase".
    """

    _, c_value = Clamp(**cfg["clamp"]).require(read_search(hparams), "categories")
    conds = pd.read_parquet(conditions)
    cats = sorted(conds.category.unique())
    df = pd.read_parquet(promptset)
    ev = df[(df.label == "harmful") & (df.variant == "plain") & (df.split == cfg["eval_split"]) & df.category.isin(cats)]
    ev = sample_each(ev, "category", cfg["eval_max_prompts"], cfg["seed"])
    missing = sorted(set(cats) - set(ev.category))
    if missing:
        log.warning("no %s prompts for categories %s: their clamps are not scored", cfg["eval_split"], missing)
    model, tok, system_prompt = open_model(model_dir, spec)
    sae_map = open_saes(sae_dirs, spec, model)
    d_sae = {l: s.cfg.d_sae for l, s in sae_map.items()}
    judge, judge_name = stage_judge(substrings, fourlabel, harmbench=harmbench)
    errors = error_set(fourlabel)

    c_of = {cond: cfg["c_by_condition"].get(cond, c_value) for cond in ("all", "specific", "common", "transfer")}

    def run(name: str, fs: clamp.FeatureSet | None, pinned: clamp.FeatureSet | None = None, c: float = c_value,
            ) -> np.ndarray:
        intervention = clamp.FeatureClamp(sae_map, fs, mode="multiply", value=c) if fs else None
        if fs and pinned:
            intervention = clamp.PinnedFeatureClamp(sae_map, fs, mode="multiply", value=c, pinned=pinned)
            log.info("%s: %d latents per prompt pinned to their clean values", name, pinned.size)
            intervention.record_clean(model, tok, list(ev.instruction), list(ev.id), system_prompt=system_prompt,
                                      batch_size=cfg["batch_size"])
        gens = generate(model, tok, list(ev.instruction), max_new_tokens=cfg["max_new_tokens"],
                        batch_size=cfg["batch_size"], intervention=intervention, system_prompt=system_prompt,
                        desc=f"categories {name}", prompt_ids=list(ev.id) if fs else None)
        return np.asarray(judge(list(ev.instruction), gens))

    rows_of = {c: i for i, c in enumerate(cats)}
    prompt_rows = dict(zip(ev.id, ev.category))
    # (condition, offset): under offset k, category i clamps the set of category i + k, so one
    # generation pass serves every category and each transfer source is used once per pass
    results = {("base", 0): run("base", None)}
    for cond, k in [("all", 0), ("specific", 0), ("common", 0)] + [("transfer", k) for k in range(1, len(cats))]:
        src = {c: cats[(i + k) % len(cats)] for i, c in enumerate(cats)}
        sel = conds[(conds.condition == cond) & (conds.category.map(src) == conds.source)]
        if sel.empty:  # an empty set (no common latent) clamps nothing: its generations are the base's
            results[(cond, k)] = results[("base", 0)]
            continue
        as_set = lambda rows: _condition_feature_set(rows.assign(key=rows.category), rows_of, len(cats),  # noqa: E731
                                                     prompt_rows, d_sae)
        pin = _pinned_rows(conds, cond) if cfg["pin_other_set"] else None
        results[(cond, k)] = run(f"{cond} +{k}" if k else cond, as_set(sel),
                                 as_set(pin) if pin is not None and not pin.empty else None, c_of[cond])
    rows = []
    sizes = conds.groupby(["category", "condition", "source"]).size()
    for (cond, k), labels in results.items():
        for i, c in enumerate(cats):
            m = (ev.category == c).to_numpy()
            if not m.any():  # nothing held out for this category: its rates are undefined, not 0
                continue
            source = cats[(i + k) % len(cats)]
            n_feat = 0 if cond == "base" else int(sizes.get((c, cond, source), 0))
            rows.append({"category": c, "condition": cond, "source": source,
                         **label_rate(labels[m], "compliance", boot, errors, "jailbreak"), "n_features": n_feat,
                         "c": None if cond == "base" else c_of[cond], "judge": judge_name})
    rates = pd.DataFrame(rows)
    norm = categories.normalized_jailbreak(rates[rates.condition != "base"])
    base = rates[rates.condition == "base"].set_index("category").jailbreak_rate
    norm["base_jailbreak_rate"] = norm.category.map(base)
    write_parquet(rates, outputs["rates"])
    write_table(norm, outputs["table"])
    write_table(categories.summarize_conditions(norm), outputs["summary"])
    figures.normalized_jailbreak_figure(norm, caption, outputs["figure_stem"])


def _circuit_groups(df: pd.DataFrame, cats: Sequence[str], split: str, cap: int | None, seed: int,
                    safe_variant: str = "twin") -> pd.DataFrame:
    """Toxic (plain harmful) and safe (harmless ``safe_variant``: twins, or OR-Bench's bait)
    prompts of each category in ``split``. A promptset without safe prompts (CatQA) gives toxic only."""
    rows = df[(df.split == split) & df.category.isin(cats) & (
        ((df.label == "harmful") & (df.variant == "plain")) | ((df.label == "harmless") & (df.variant == safe_variant)))]
    if not (rows.label == "harmless").any():
        log.warning("no harmless %s prompts of these categories in %s: toxic circuits only", safe_variant, split)
    rows = rows.assign(group=np.where(rows.label == "harmful", "toxic", "safe"))
    return sample_each(rows, ["group", "category"], cap, seed)


def circuits(*, model_dir: str, spec: Mapping, promptset: str, category_summary: str | None, direction_summary: str,
             sae_dirs: Sequence[str], submodule_sae_dirs: Sequence[str], cfg: Mapping, outputs: Mapping[str, str],
             caption: str) -> None:
    """Per-prompt node and edge scores (circuits.py), each category's circuit for toxic and safe
    prompts as a graph file, and faithfulness/completeness curves on held-out prompts. Nodes live
    at every resid SAE, and at the attention and MLP SAEs of ``submodule_sae_dirs`` (Marks et al.)."""
    import networkx as nx

    cc = cfg["circuits"]
    df = pd.read_parquet(promptset)
    # F*_cat's categories where the circuits share its promptset; else every category of their own
    cats = (json.loads(Path(category_summary).read_text())["categories"] if category_summary
            else _category_prompts(df, cfg["fit_split"], cfg["min_prompts"], None))
    info = json.loads(Path(direction_summary).read_text())
    refusal_ids = info["refusal_token_ids"]
    fit = _circuit_groups(df, cats, cfg["fit_split"], cc["max_prompts"], cfg["seed"], cc["safe_variant"])
    ev = _circuit_groups(df, cats, cfg["eval_split"], cc["eval_max_prompts"], cfg["seed"], cc["safe_variant"])
    model, tok, system_prompt = open_model(model_dir, spec)
    sae_map = {Site(layer): sae for layer, sae in open_saes(sae_dirs, spec, model).items()}
    sae_map.update(open_submodule_saes(submodule_sae_dirs, spec, model))
    layers = sorted(sae_map)
    if {s.submodule for s in layers} != set(cc["submodules"]):
        raise ValueError(f"circuits.submodules {cc['submodules']}, but the SAEs read {sorted({s.label for s in layers})}")
    means = reference_means(model, tok, sae_map, list(fit.instruction), cc["batch_size"], system_prompt)
    nodes, m_clean = node_scores(model, tok, sae_map, list(fit.instruction), means, refusal_ids, steps=cc["steps"],
                                   batch_size=cc["batch_size"], system_prompt=system_prompt)
    keys = list(zip(fit.group, fit.category))
    group_means = {k: {l: nodes[l][np.flatnonzero([x == k for x in keys])].mean(0).numpy() for l in layers}
                   for k in sorted(set(keys))}
    overall = {l: nodes[l].mean(0).numpy() for l in layers}
    top = max(cc["n_nodes"], max(cc["sizes"]))
    node_pool = choose_pools(group_means, overall, cc["node_pool"], top)
    edge_pool = choose_pools(group_means, overall, cc["edge_pool"], cc["n_nodes"])
    edges = edge_scores(model, tok, sae_map, list(fit.instruction), means, refusal_ids, edge_pool,
                          batch_size=cc["batch_size"], system_prompt=system_prompt)
    tensors = {"m_clean": m_clean}
    for l in layers:
        keep = torch.as_tensor(np.append(node_pool[l], sae_map[l].cfg.d_sae), dtype=torch.long)
        tensors[f"nodes.{l.name}"] = nodes[l][:, keep].float()
        tensors[f"node_ids.{l.name}"] = torch.as_tensor(np.append(node_pool[l], -1))
        tensors[f"edge_ids.{l.name}"] = torch.as_tensor(np.append(edge_pool[l], -1))
        tensors[f"means.{l.name}"] = means.latents[l].float()
    for (a, b), e in edges.items():
        tensors[f"edges.{a.name}.{b.name}"] = e.float()
    # sites by name (a bare layer for resid); the edge pairs, as submodules make them other than consecutive
    write_safetensors(tensors, outputs["scores"], metadata={
        "layers": json.dumps([l.name for l in layers]),
        "pairs": json.dumps([[a.name, b.name] for a, b, _ in edge_pairs(layers)])})
    write_parquet(fit[["id", "category", "label", "group", "split"]].assign(m_clean=m_clean.numpy()), outputs["index"])

    scores = Scores(layers, {l: tensors[f"node_ids.{l.name}"].numpy() for l in layers},
                    {l: tensors[f"nodes.{l.name}"].numpy() for l in layers},
                    {l: tensors[f"edge_ids.{l.name}"].numpy() for l in layers},
                    {p: e.numpy() for p, e in edges.items()})
    curves = []
    # error_nodes "nodes": an error node is ablated unless the circuit holds it (Marks et al.)
    as_nodes = cc["error_nodes"] == "nodes"

    def metric(instr: list[str], keep, errors=None) -> float:
        return ablated_metric(model, tok, sae_map, instr, means, refusal_ids, keep, batch_size=cc["batch_size"],
                              system_prompt=system_prompt, keep_errors=errors if as_nodes else None).mean().item()

    with atomic_path(outputs["graphs"], is_dir=True) as tmp:
        for (group, cat) in sorted(set(keys)):
            rows = np.flatnonzero([k == (group, cat) for k in keys])
            circuit = discover(scores, rows, cc["n_nodes"], cc["n_edges"], cc["node_threshold"])
            g = nx.DiGraph(model=model_dir, category=cat, group=group, n_prompts=len(rows),
                           metric="refusal log-odds at the last prompt token", ablation="mean")
            for (l, i), ie in circuit.nodes.items():
                g.add_node(f"{l.label}/{'err' if i < 0 else i}", layer=l.layer, submodule=l.submodule, latent=i,
                           error=i < 0, ie=ie)
            for (a, u, b, d), w in circuit.edges.items():
                g.add_edge(f"{a.label}/{'err' if u < 0 else u}", f"{b.label}/{'err' if d < 0 else d}", weight=w)
            (tmp / group).mkdir(exist_ok=True)
            nx.write_graphml(g, tmp / group / f"{cat}.graphml")
            # faithfulness on the category's held-out prompts, circuits of growing size
            held = ev[(ev.group == group) & (ev.category == cat)]
            if held.empty:
                continue
            instr = list(held.instruction)
            none = {l: torch.zeros(sae_map[l].cfg.d_sae, dtype=torch.bool) for l in layers}
            m_model = metric(instr, None)  # keep=None: the model itself, errors and all
            m_empty = metric(instr, none, {l: False for l in layers})
            for n in cc["sizes"]:
                sized = discover(scores, rows, n, 0)
                keep = {l: torch.zeros(sae_map[l].cfg.d_sae, dtype=torch.bool) for l in layers}
                errors = {l: False for l in layers}
                for (l, i) in sized.nodes:
                    if i >= 0:
                        keep[l][i] = True
                    else:
                        errors[l] = True
                m_c = metric(instr, keep, errors)
                m_rest = metric(instr, {l: ~k for l, k in keep.items()}, {l: not e for l, e in errors.items()})
                curves.append({"group": group, "category": cat, "n_per_layer": n,
                               "n_nodes": int(sum(int(k.sum()) for k in keep.values())),
                               "faithfulness": faithfulness(m_c, m_empty, m_model),
                               "completeness": faithfulness(m_rest, m_empty, m_model),
                               "m_circuit": m_c, "m_complement": m_rest, "m_empty": m_empty, "m_model": m_model,
                               "n_prompts": len(held), "split": cfg["eval_split"], "error_nodes": cc["error_nodes"]})
    curves = pd.DataFrame(curves)
    write_table(curves, outputs["faithfulness"])
    figures.faithfulness_figure(curves, caption, outputs["figure_stem"])


def modularity(*, scores_path: str, index_path: str, steering_summary: str, cfg: Mapping, outputs: Mapping[str, str],
               caption: str) -> None:
    """Similarity matrices, the permutation test, bootstrap intervals, pairwise tests and the
    verdict (modularity.py), for toxic and for safe prompts."""

    t = load_file(scores_path)
    with safe_open(scores_path, "pt") as fh:
        meta = fh.metadata()
    layers = json.loads(meta["layers"])
    index = pd.read_parquet(index_path)
    pairs = [tuple(p) for p in json.loads(meta["pairs"])]
    tc = cfg["test"]
    pcfg = PermutationConfig(n_nodes=cfg["circuits"]["n_nodes"], n_edges=cfg["circuits"]["n_edges"],
                               n_permutations=tc["n_permutations"], n_bootstrap=tc["n_bootstrap"],
                               confidence=tc["confidence"], alpha=tc["alpha"], seed=tc["seed"],
                               threshold=cfg["circuits"]["node_threshold"])
    results, matrices, tests_all, pairwise_all = {}, [], [], []
    for group in [g for g in ("toxic", "safe") if (index.group == g).any()]:
        rows = np.flatnonzero(index.group.to_numpy() == group)
        if len(rows) == 0:
            continue
        scores = Scores(layers, {l: t[f"node_ids.{l}"].numpy() for l in layers},
                          {l: t[f"nodes.{l}"].numpy()[rows] for l in layers},
                          {l: t[f"edge_ids.{l}"].numpy() for l in layers},
                          {(a, b): t[f"edges.{a}.{b}"].numpy()[rows] for a, b in pairs})
        groups = index.category.to_numpy()[rows]
        circuits = circuits_by_group(scores, groups, pcfg.n_nodes, pcfg.n_edges, pcfg.threshold)
        for kind in SIMILARITIES:
            mat = similarity_matrix(circuits, kind)
            matrices.append(mat.rename_axis(index="a", columns="b").stack().rename("value").reset_index()
                            .assign(group=group, similarity=kind))
        log.info("%s: permutation test (%d permutations, %d bootstrap resamples)", group, pcfg.n_permutations,
                 pcfg.n_bootstrap)
        tests = permutation_test(scores, groups, pcfg).assign(group=group)
        pairwise = pairwise_tests(scores, groups, pcfg, kind=tc["primary"]).assign(group=group)
        results[group] = verdict(tests, pairwise, tc["alpha"], tc["mixed_ratio"], tc["primary"])
        results[group]["n_prompts"] = int(len(rows))
        tests_all.append(tests)
        pairwise_all.append(pairwise)
    matrices = pd.concat(matrices, ignore_index=True)
    write_table(matrices, outputs["similarity"])
    write_table(pd.concat(tests_all, ignore_index=True), outputs["tests"])
    write_table(pd.concat(pairwise_all, ignore_index=True), outputs["pairwise"])
    steering_evidence = pd.read_csv(steering_summary).to_dict("records")
    keys = ("verdict", "p_value", "observed", "null_mean", "ratio", "effect", "z", "ci", "n_permutations",
            "n_bootstrap", "pairs_significant", "pairs", "n_prompts")
    shown = pd.DataFrame([{"group": g, **{k: (", ".join(f"{x:.3f}" for x in r[k]) if k == "ci" else r[k])
                                           for k in keys}} for g, r in results.items()])
    with atomic_path(outputs["verdict_html"]) as tmp:
        tmp.write_text(table_html(shown, f"verdict ({tc['primary']})", "verdict.csv"), encoding="utf-8")
    write_json({"verdict": results.get("toxic", {}).get("verdict"), "question": "is refusal of harmful prompts one "
                "circuit shared by the harm categories (monolithic), one per category (modular), or a shared core "
                "with category-specific parts (mixed)?", "decided_on": "toxic", "rule": verdict.__doc__.strip(),
                "by_group": results, "normalized_jailbreak": steering_evidence}, outputs["verdict"])
    figures.similarity_figure(matrices, caption, outputs["figure_stem"])
