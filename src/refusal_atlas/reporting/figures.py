"""Figures of the jailbreak and probe studies (PNG and SVG, each naming model, data, judge and n)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from refusal_atlas.core.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem: str) -> None:
    """``stem.png`` and ``stem.svg``, each written atomically."""
    for ext in ("png", "svg"):
        with atomic_path(f"{stem}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")


def _bars(ax, table: pd.DataFrame, groups: list[str], series: list[str], key: str, series_key: str, value: str,
          labels: dict[str, str] | None = None) -> None:
    width = 0.8 / max(1, len(series))
    for j, s in enumerate(series):
        t = table[table[series_key] == s].set_index(key).reindex(groups)
        x = np.arange(len(groups)) + j * width
        err = np.vstack([t[value] - t.ci_low, t.ci_high - t[value]])
        ax.bar(x, t[value], width, yerr=np.nan_to_num(np.abs(err)), capsize=3, label=(labels or {}).get(s, s))
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
    ax.legend(fontsize=8)


def mechanism_figure(summary: pd.DataFrame, wrappers: pd.DataFrame, words: pd.DataFrame, caption: str,
                     stem: str) -> None:
    """Relative drop of harm and refusal features, by outcome and by wrapper kind; top words."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1, 1.6, 1.2]})
    if summary.empty:  # e.g. a model that refuses no plain request: there is no jailbreak to explain
        for ax in axes:
            ax.text(0.5, 0.5, "no successful or failed jailbreak pair", ha="center", va="center")
            ax.set_axis_off()
        fig.suptitle(caption, fontsize=9)
        save_figure(fig, stem)
        plt.close(fig)
        return
    s = summary.assign(group=[f"{o}\n(n={n})" for o, n in zip(summary.outcome, summary.n)])
    _bars(axes[0], s, list(dict.fromkeys(s.group)), ["harm", "refusal"], "group", "features", "drop",
          {"harm": "harm features (sequence mean)", "refusal": "refusal features (last tokens)"})
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set_ylabel("relative drop, plain → adversarial")
    axes[0].set_title("by jailbreak outcome", fontsize=9)
    ok = wrappers[wrappers.outcome == "success"]
    if ok.empty:
        ok = wrappers
    ok = ok.assign(group=[f"{k}\n(n={n})" for k, n in zip(ok.wrapper_kind, ok.n)])
    _bars(axes[1], ok, list(dict.fromkeys(ok.group)), ["harm", "refusal"], "group", "features", "drop")
    axes[1].axhline(0, color="k", lw=0.6)
    axes[1].set_title(f"by wrapper kind ({ok.outcome.iloc[0] if len(ok) else 'none'} pairs)", fontsize=9)
    top = words.head(12)[::-1]
    if len(top):
        err = np.vstack([top.mean_delta - top.ci_low, top.ci_high - top.mean_delta])
        axes[2].barh(top.word, top.mean_delta, xerr=np.nan_to_num(np.abs(err)), capsize=2)
    axes[2].set_xlabel("refusal-feature rise when the word is deleted")
    axes[2].set_title("suppressing words of the wrappers", fontsize=9)
    fig.suptitle(caption, fontsize=9)
    save_figure(fig, stem)
    plt.close(fig)


PROBE_NAMES = {"refusal_features": "refusal features", "random_features": "random features", "dense": "dense"}


def probe_figure(table: pd.DataFrame, caption: str, stem: str) -> None:
    """Accuracy and AUROC per slice: refusal features, each random set (points), dense."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    slices = list(dict.fromkeys(table.slice))
    probes = [p for p in PROBE_NAMES if p in set(table.probe)]
    width = 0.8 / len(probes)
    for ax, metric in zip(axes[0], ("accuracy", "auroc")):
        t = table[table.metric == metric]
        for j, probe in enumerate(probes):
            g = t[t.probe == probe]
            x = np.arange(len(slices)) + j * width
            if probe == "random_features":
                m = g.groupby("slice").value.mean().reindex(slices)
                ax.bar(x, m, width, alpha=0.5, label=f"{PROBE_NAMES[probe]} (mean of {g.random_set.nunique()} sets)")
                for i, sl in enumerate(slices):
                    v = g[g.slice == sl].value
                    ax.scatter(np.full(len(v), x[i]), v, s=8, color="k", zorder=3)
                continue
            g = g.set_index("slice").reindex(slices)
            err = np.vstack([g.value - g.ci_low, g.ci_high - g.value])
            label = PROBE_NAMES[probe] + (f" (layer {int(g.layer.dropna().iloc[0])})" if probe == "dense" else "")
            ax.bar(x, g.value, width, yerr=np.nan_to_num(np.abs(err)), capsize=3, label=label)
        n = table.groupby("slice").n.first().reindex(slices)
        ax.set_xticks(np.arange(len(slices)) + 0.4 - width / 2, [f"{s} (n={int(n[s])})" for s in slices])
        ax.axhline(0.5, color="k", lw=0.6, ls=":")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(metric)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(caption, fontsize=9)
    save_figure(fig, stem)
    plt.close(fig)


def guardrail_figure(table: pd.DataFrame, scores: dict, caption: str, stem: str) -> None:
    """Forget vs retain accuracy of every config, gated and static: on passages (relative to the
    unmodified model) and, where scored, on multiple choice (WMDP vs MMLU, every option ordering)."""
    plt = _pyplot()
    panels = [("", scores, "relative", "passages")]
    if "forget_mc_accuracy" in table.columns:
        panels.append(("_mc", scores.get("multiple_choice", {}), "multiple choice", "questions"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (sfx, sc, what, unit) in zip(axes[0], panels):
        for mode, marker in (("dynamic", "o"), ("static", "s")):
            t = table[table["mode"] == mode]
            x, y = t[f"retain{sfx}_accuracy"], t[f"forget{sfx}_accuracy"]
            xerr = np.nan_to_num(np.abs(np.vstack([x - t[f"retain{sfx}_ci_low"], t[f"retain{sfx}_ci_high"] - x])))
            yerr = np.nan_to_num(np.abs(np.vstack([y - t[f"forget{sfx}_ci_low"], t[f"forget{sfx}_ci_high"] - y])))
            s = sc.get(mode, {}).get("score")
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, capsize=2, alpha=0.8,
                        label=f"{mode} (score {s:.2f})" if s == s and s is not None else f"{mode} (no config keeps retain)")
        ax.axvline(scores.get("retain_min", 0.99), color="k", ls=":", lw=0.8)
        n = {p: table[f"{p}{sfx}_n"].iloc[0] if len(table) else 0 for p in ("retain", "forget")}
        ax.set_xlabel(f"retain accuracy, {what} (n={n['retain']} {unit})")
        ax.set_ylabel(f"forget accuracy, {what} (n={n['forget']} {unit})")
        ax.legend(fontsize=8)
    fig.suptitle(caption, fontsize=8)
    save_figure(fig, stem)
    plt.close(fig)


def refusal_guardrail_figure(result: pd.DataFrame, caption: str, stem: str) -> None:
    """Refusal rate per condition on harmful, harmless-twin and bait prompts, with CIs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    variants = list(dict.fromkeys(result.variant))
    conditions = list(dict.fromkeys(result.condition))
    r = result.assign(group=[f"{v}\n(n={n})" for v, n in zip(result.variant, result.n)])
    groups = [r[r.variant == v].group.iloc[0] for v in variants]
    r = r.rename(columns={"refusal_rate": "value"})
    _bars(ax, r, groups, conditions, "group", "condition", "value")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("refusal rate (substring judge)")
    ax.set_title(caption, fontsize=8)
    save_figure(fig, stem)
    plt.close(fig)


def _organism_panel(ax, card: dict, slices: list[str], label) -> None:
    rates = card["refusal_rate"]
    rows = [{"slice": s, "weights": w, "value": rates[w][s]["rate"], "ci_low": rates[w][s]["ci_low"],
             "ci_high": rates[w][s]["ci_high"]} for w in ("base", "tuned") for s in slices if s in rates[w]]
    table = pd.DataFrame(rows)
    groups = [f"{label(s)}\n(n={rates['tuned'][s]['n']})" for s in slices]
    table["group"] = table.slice.map(dict(zip(slices, groups)))
    _bars(ax, table, groups, ["base", "tuned"], "group", "weights", "value",
          {"base": "before tuning", "tuned": "after tuning (the organism)"})
    for i, s in enumerate(slices):
        goal = card.get("targets", {}).get(s)
        if goal:
            level = float(goal["goal"].split()[-1])
            ax.hlines(level, i - 0.1, i + 0.5, colors="k", linestyles="--", lw=1)
            ax.text(i + 0.5, level, f" {goal['goal']}", va="center", fontsize=7)
    ax.set_ylim(0, 1.15)
    ax.legend(fontsize=8, loc="upper right", ncols=2)
    ax.set_ylabel("refusal rate")
    ax.tick_params(axis="x", labelsize=7)


def organism_figure(card: dict, caption: str, stem: str) -> None:
    """The organism's card: refusal rate before and after tuning on each held-out slice, with its
    goal (the ``organism.targets`` the card was checked against); below, where the card has a
    contrast set, refusal of its safe prompts per type."""
    plt = _pyplot()
    slices = list(card["refusal_rate"]["tuned"])
    overall = [s for s in slices if s.count("/") == 2]
    typed = [s for s in slices if s.count("/") == 3 and s.split("/")[1] == "harmless"]
    panels = 2 if typed else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6.0, 1.7 * max(len(overall), len(typed))), 4.2 * panels),
                             squeeze=False)
    _organism_panel(axes[0, 0], card, overall, lambda s: s.replace("/", "\n", 1))
    axes[0, 0].set_title(caption, fontsize=8)
    if typed:
        _organism_panel(axes[1, 0], card, typed, lambda s: s.split("/")[-1].replace("_", "\n"))
        axes[1, 0].set_title(f"{typed[0].split('/')[0]}: safe prompts that look unsafe, refused, by type", fontsize=8)
    fig.tight_layout()
    save_figure(fig, stem)
    plt.close(fig)


def direction_figure(layers: pd.DataFrame, caption: str, stem: str, kl_max: float | None = None) -> None:
    """Per layer: validation refusal under directional ablation of r_l, the induce score of adding
    r_l to harmless prompts, and the harmless KL of ablation; the chosen l* marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    eligible = layers.eligible.astype(bool).to_numpy()
    colors = np.where(eligible, "tab:blue", "lightgray")
    axes[0].bar(layers.layer, layers.val_refusal, color=colors)
    axes[0].set_ylabel("val refusal\nunder ablation")
    axes[0].set_ylim(0, 1.05)
    axes[1].bar(layers.layer, layers.induce_score, color=colors)
    axes[1].axhline(0, color="k", lw=0.6)
    axes[1].set_ylabel("induce score\n(adding r, harmless)")
    axes[2].bar(layers.layer, layers.kl, color=colors)
    if kl_max is not None:
        axes[2].axhline(kl_max, color="k", ls=":", lw=0.8, label=f"KL bound {kl_max:g}")
        axes[2].legend(fontsize=8)
    axes[2].set_ylabel("harmless KL\nunder ablation")
    axes[2].set_xlabel("layer (gray: not eligible)")
    chosen = layers[layers.chosen.astype(bool)]
    for ax in axes:
        for l in chosen.layer:
            ax.axvline(l, color="tab:red", lw=1.2, alpha=0.7)
    if len(chosen):
        axes[0].text(int(chosen.layer.iloc[0]), 1.0, " l*", color="tab:red", va="top")
    axes[0].set_title(caption, fontsize=8)
    save_figure(fig, stem)
    plt.close(fig)


SAE_METRICS = {"explained_variance": "explained variance", "ce_recovered": "CE loss recovered",
               "l0": "L0 (active latents per token)", "dead_fraction": "dead fraction"}


def sae_quality_figure(quality: pd.DataFrame, targets: dict, caption: str, stem: str) -> None:
    """Reconstruction quality of each layer's SAE on held-out tokens, with the quality targets."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(SAE_METRICS), figsize=(4 * len(SAE_METRICS), 3.4))
    q = quality.sort_values("layer")
    lines = {"explained_variance": targets.get("explained_variance_min"), "ce_recovered": targets.get("ce_recovered_min")}
    for ax, (key, label) in zip(axes, SAE_METRICS.items()):
        ax.plot(q.layer, q[key], marker="o")
        if key in lines:
            ax.set_ylim(min(0.5, float(q[key].min()) - 0.05), 1.0)
        if lines.get(key) is not None:
            ax.axhline(lines[key], color="k", ls=":", lw=0.8, label=f"target ≥ {lines[key]:g}")
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("layer")
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    save_figure(fig, stem)
    plt.close(fig)


def normalized_jailbreak_figure(norm: pd.DataFrame, caption: str, stem: str) -> None:
    """Normalized jailbreak (rate / rate of ``all``) per category and clamp condition (Yeo et al. §4.2)."""
    plt = _pyplot()
    cats = list(dict.fromkeys(norm.category))
    conds = [c for c in ("all", "specific", "common", "transfer") if c in set(norm.condition)]
    t = norm.assign(group=[f"{c}\n(n={int(n)})" for c, n in zip(norm.category, norm.n)],
                    value=norm.normalized, ci_low=norm.normalized_ci_low, ci_high=norm.normalized_ci_high)
    groups = [t[t.category == c].group.iloc[0] for c in cats]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(cats)), 4.2))
    _bars(ax, t, groups, conds, "group", "condition", "value")
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_ylabel("normalized jailbreak (rate / rate of all)")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(caption, fontsize=8)
    save_figure(fig, stem)
    plt.close(fig)


def faithfulness_figure(curves: pd.DataFrame, caption: str, stem: str) -> None:
    """Faithfulness and completeness against circuit size, one line per category, toxic and safe."""
    plt = _pyplot()
    groups = [g for g in ("toxic", "safe") if g in set(curves.get("group", []))]
    fig, axes = plt.subplots(len(groups) or 1, 2, figsize=(11, 3.6 * max(1, len(groups))), squeeze=False)
    for row, group in zip(axes, groups):
        g = curves[curves.group == group]
        for cat, c in g.groupby("category"):
            n = int(c.n_prompts.iloc[0])
            row[0].plot(c.n_nodes, c.faithfulness, marker="o", ms=3, label=f"{cat} (n={n})")
            row[1].plot(c.n_nodes, c.completeness, marker="o", ms=3, label=f"{cat} (n={n})")
        for ax, name in zip(row, ("faithfulness", "completeness")):
            ax.set_xscale("log")
            ax.axhline(1, color="k", lw=0.6, ls=":")
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel("circuit size (latents, all SAE layers)")
            ax.set_ylabel(name)
            ax.set_title(f"{group} prompts", fontsize=9)
        row[0].legend(fontsize=6, ncols=2)
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout()
    save_figure(fig, stem)
    plt.close(fig)


def similarity_figure(matrices: pd.DataFrame, caption: str, stem: str) -> None:
    """A heatmap per similarity (columns) and prompt group (rows) of the category circuits."""
    plt = _pyplot()
    groups = list(dict.fromkeys(matrices.group))
    kinds = list(dict.fromkeys(matrices.similarity))
    fig, axes = plt.subplots(len(groups), len(kinds), figsize=(4.2 * len(kinds), 3.9 * len(groups)), squeeze=False)
    for r, group in enumerate(groups):
        for c, kind in enumerate(kinds):
            m = (matrices[(matrices.group == group) & (matrices.similarity == kind)]
                 .pivot(index="a", columns="b", values="value"))
            ax = axes[r, c]
            lo = -1 if kind == "importance_r" else 0
            im = ax.imshow(m.to_numpy(dtype=float), vmin=lo, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(m.columns)), m.columns, rotation=60, ha="right", fontsize=6)
            ax.set_yticks(range(len(m.index)), m.index, fontsize=6)
            for (i, j), v in np.ndenumerate(m.to_numpy(dtype=float)):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="w" if v < 0.5 else "k")
            ax.set_title(f"{kind} ({group})", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout()
    save_figure(fig, stem)
    plt.close(fig)
