"""Is refusal one circuit or one per harm category? Circuit similarity and a valid test.

Circuits come from per-prompt node and edge scores (circuits.py): a group's circuit is the top
``n`` nodes per SAE layer by |mean IE| over its prompts, and the top edges between those nodes.
Circuits are compared pairwise by four similarities, each reported on its own:

    Jaccard            |A ∩ B| / |A ∪ B| of the node sets
    weighted Jaccard   Σ min(w_A, w_B) / Σ max(w_A, w_B), w = |IE| normalised to sum 1 per circuit
    edge Jaccard       Jaccard of the edge sets
    importance r       Pearson correlation of the mean IEs on the shared nodes (≥ 3 of them)

The reference compared each circuit with one random circuit, so its p-values were uniform by
construction (ARCHITECTURE.md). Here the null is exchangeability of the category labels: if
refusal is one mechanism, relabelling prompts at random and rediscovering leaves the mean
off-diagonal similarity S where it was. The one-sided permutation p-value for "more modular than
chance" is (1 + #{S_perm ≤ S_obs}) / (1 + P) (Phipson & Smyth 2010). Bootstrap intervals resample
prompts within each category; pairwise tests permute the labels of two categories' prompts and are
corrected for multiplicity by Benjamini–Hochberg.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

SIMILARITIES = ("jaccard", "weighted_jaccard", "edge_jaccard", "importance_r")


@dataclass(frozen=True)
class Circuit:
    """Node keys ``(layer, node)`` with their mean IE, and edge keys ``(layer, up, layer', down)``."""

    nodes: dict[tuple[int, int], float]
    edges: dict[tuple[int, int, int, int], float] = field(default_factory=dict)


@dataclass
class Scores:
    """Per-prompt scores over candidate pools (circuits.py). ``nodes[l]`` is ``[n, |pool_l| + 1]``
    (the error node last), ``edges[(l, l')]`` is ``[n, |epool_l'| + 1, |epool_l| + 1]``."""

    layers: list[int]
    node_ids: dict[int, np.ndarray]  # latent index of each column (-1: the error node)
    nodes: dict[int, np.ndarray]
    edge_ids: dict[int, np.ndarray] = field(default_factory=dict)
    edges: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)


def discover(scores: Scores, rows: np.ndarray, n_nodes: int, n_edges: int, threshold: float | None = None) -> Circuit:
    """The circuit of the prompts ``rows``: top ``n_nodes`` latents per layer by |mean IE| (or,
    with ``threshold``, every latent with |mean IE| ≥ threshold; Marks et al.'s T_N), the error
    nodes always, and the top ``n_edges`` edges by |mean| per adjacent layer pair among them."""
    nodes = {}
    for l in scores.layers:
        mean = scores.nodes[l][rows].mean(0)
        ids = scores.node_ids[l]
        lat = np.flatnonzero(ids >= 0)
        order = lat[np.argsort(-np.abs(mean[lat]), kind="stable")]
        top = order[np.abs(mean[order]) >= threshold] if threshold is not None else order[:n_nodes]
        for j in top:
            if mean[j] != 0:
                nodes[(l, int(ids[j]))] = float(mean[j])
        err = np.flatnonzero(ids < 0)
        nodes[(l, -1)] = float(mean[err[0]]) if len(err) else 0.0
    edges = {}
    for (a, b), e in scores.edges.items():
        mean = e[rows].mean(0)  # [down, up]
        up_ids, down_ids = scores.edge_ids[a], scores.edge_ids[b]
        keep_up = np.array([(a, int(i)) in nodes for i in up_ids])
        keep_down = np.array([(b, int(i)) in nodes for i in down_ids])
        sub = np.where(keep_down[:, None] & keep_up[None, :], np.abs(mean), -np.inf)
        flat = np.argsort(-sub, axis=None, kind="stable")[:n_edges]
        for f in flat:
            d, u = np.unravel_index(f, sub.shape)
            if np.isfinite(sub[d, u]) and sub[d, u] > 0:
                edges[(a, int(up_ids[u]), b, int(down_ids[d]))] = float(mean[d, u])
    return Circuit(nodes, edges)


def _latents(c: Circuit) -> dict[tuple[int, int], float]:
    return {k: v for k, v in c.nodes.items() if k[1] >= 0}


def jaccard(a: set, b: set) -> float:
    union = a | b
    return float(len(a & b) / len(union)) if union else float("nan")


def weighted_jaccard(a: Mapping, b: Mapping) -> float:
    wa, wb = ({k: abs(v) for k, v in x.items()} for x in (a, b))
    sa, sb = sum(wa.values()), sum(wb.values())
    if sa == 0 or sb == 0:
        return float("nan")
    keys = set(wa) | set(wb)
    num = sum(min(wa.get(k, 0) / sa, wb.get(k, 0) / sb) for k in keys)
    den = sum(max(wa.get(k, 0) / sa, wb.get(k, 0) / sb) for k in keys)
    return float(num / den)


def importance_correlation(a: Mapping, b: Mapping, min_shared: int = 3) -> float:
    shared = sorted(set(a) & set(b))
    if len(shared) < min_shared:
        return float("nan")
    x, y = np.array([a[k] for k in shared]), np.array([b[k] for k in shared])
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def similarity(a: Circuit, b: Circuit, kind: str) -> float:
    la, lb = _latents(a), _latents(b)
    if kind == "jaccard":
        return jaccard(set(la), set(lb))
    if kind == "weighted_jaccard":
        return weighted_jaccard(la, lb)
    if kind == "edge_jaccard":
        return jaccard(set(a.edges), set(b.edges))
    if kind == "importance_r":
        return importance_correlation(la, lb)
    raise ValueError(f"unknown similarity {kind!r}; one of {SIMILARITIES}")


def similarity_matrix(circuits: Mapping[str, Circuit], kind: str) -> pd.DataFrame:
    names = list(circuits)
    m = pd.DataFrame(np.nan, index=names, columns=names)
    for x, y in itertools.combinations_with_replacement(names, 2):
        m.loc[x, y] = m.loc[y, x] = similarity(circuits[x], circuits[y], kind)
    return m


def mean_off_diagonal(matrix: pd.DataFrame | np.ndarray) -> float:
    a = np.asarray(matrix, dtype=float)
    off = a[~np.eye(len(a), dtype=bool)]
    off = off[np.isfinite(off)]
    return float(off.mean()) if off.size else float("nan")


def circuits_by_group(scores: Scores, groups: np.ndarray, n_nodes: int, n_edges: int,
                      threshold: float | None = None) -> dict[str, Circuit]:
    return {str(g): discover(scores, np.flatnonzero(groups == g), n_nodes, n_edges, threshold)
            for g in sorted(set(groups))}


def mean_similarity(scores: Scores, groups: np.ndarray, n_nodes: int, n_edges: int,
                    kinds: Sequence[str] = SIMILARITIES, threshold: float | None = None) -> dict[str, float]:
    circuits = circuits_by_group(scores, groups, n_nodes, n_edges, threshold)
    return {k: mean_off_diagonal(similarity_matrix(circuits, k)) for k in kinds}


@dataclass(frozen=True)
class PermutationConfig:
    n_nodes: int = 10
    n_edges: int = 20
    n_permutations: int = 1000
    n_bootstrap: int = 200
    confidence: float = 0.95
    alpha: float = 0.05
    seed: int = 0
    threshold: float | None = None


def permutation_test(scores: Scores, groups: np.ndarray, cfg: PermutationConfig,
                     kinds: Sequence[str] = SIMILARITIES) -> pd.DataFrame:
    """Observed mean off-diagonal similarity per kind, its permutation null and bootstrap interval.

    One row per kind: observed, null mean and sd, effect (observed - null mean), z, the
    ratio observed / null mean, the one-sided p (observed lower than under exchangeable labels),
    the bootstrap interval, and the counts behind them.
    """
    rng = np.random.default_rng(cfg.seed)
    observed = mean_similarity(scores, groups, cfg.n_nodes, cfg.n_edges, kinds, cfg.threshold)
    null = {k: [] for k in kinds}
    for _ in range(cfg.n_permutations):
        perm = rng.permutation(groups)
        for k, v in mean_similarity(scores, perm, cfg.n_nodes, cfg.n_edges, kinds, cfg.threshold).items():
            null[k].append(v)
    index = {g: np.flatnonzero(groups == g) for g in sorted(set(groups))}

    def resampled(*ixs):
        rows = np.concatenate(ixs)
        sub = Scores(scores.layers, scores.node_ids, {l: v[rows] for l, v in scores.nodes.items()}, scores.edge_ids,
                     {p: v[rows] for p, v in scores.edges.items()})
        sims = mean_similarity(sub, groups[rows], cfg.n_nodes, cfg.n_edges, kinds, cfg.threshold)
        return np.array([sims[k] for k in kinds])

    ci = {k: (float("nan"), float("nan")) for k in kinds}
    se, bias = dict.fromkeys(kinds, float("nan")), dict.fromkeys(kinds, float("nan"))
    if cfg.n_bootstrap:
        res = stats.bootstrap(tuple(index.values()), resampled, n_resamples=cfg.n_bootstrap, vectorized=False,
                              confidence_level=cfg.confidence, method="percentile", random_state=rng)
        z = stats.norm.ppf(1 - (1 - cfg.confidence) / 2)
        for i, k in enumerate(kinds):
            dist = res.bootstrap_distribution[i][np.isfinite(res.bootstrap_distribution[i])]
            if dist.size > 1 and np.isfinite(observed[k]):
                # Rediscovering on a resample with repeated prompts finds noisier, less alike
                # circuits, so the resamples sit below the observed value; a percentile (or BCa)
                # interval would then miss it. The interval is observed ± z·SE, and the bias is
                # reported beside it.
                se[k], bias[k] = float(dist.std(ddof=1)), float(dist.mean() - observed[k])
                ci[k] = (observed[k] - z * se[k], observed[k] + z * se[k])
    rows = []
    for k in kinds:
        nul = np.array([v for v in null[k] if np.isfinite(v)])
        obs = observed[k]
        sd = float(nul.std(ddof=1)) if nul.size > 1 else float("nan")
        rows.append({
            "similarity": k, "observed": obs, "null_mean": float(nul.mean()) if nul.size else float("nan"),
            "null_sd": sd, "effect": obs - nul.mean() if nul.size else float("nan"),
            "z": (obs - nul.mean()) / sd if nul.size > 1 and sd > 0 else float("nan"),
            "ratio": obs / nul.mean() if nul.size and nul.mean() != 0 else float("nan"),
            "p_value": float((1 + np.sum(nul <= obs)) / (1 + nul.size)) if nul.size and np.isfinite(obs)
            else float("nan"),
            "ci_low": ci[k][0], "ci_high": ci[k][1], "bootstrap_se": se[k], "bootstrap_bias": bias[k],
            "n_permutations": int(nul.size), "n_bootstrap": int(cfg.n_bootstrap), "n_prompts": int(len(groups)),
            "n_groups": len(index), "n_nodes": cfg.n_nodes, "n_edges": cfg.n_edges,
        })
    return pd.DataFrame(rows)


def stratified_relabel(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A relabelling in which every new group holds each old group's prompts in proportion.

    Under exchangeable labels any partition with the same group sizes gives the statistic the
    same distribution, so these are draws from its null. Plain relabellings of two separable
    groups mostly separate them again (the larger share decides each top-n), which makes that
    null degenerate; proportional ones do not.
    """
    names, sizes = np.unique(groups, return_counts=True)
    share = sizes / sizes.sum()
    out = np.empty_like(groups)
    for g in names:
        ix = rng.permutation(np.flatnonzero(groups == g))
        counts = np.floor(share * len(ix)).astype(int)
        for i in rng.permutation(len(names))[: len(ix) - counts.sum()]:
            counts[i] += 1
        out[ix] = np.repeat(names, counts)
    # the dealt sizes can drift from the old ones by rounding: move prompts back
    for _ in range(len(groups)):
        have = {g: int((out == g).sum()) for g in names}
        over = [g for g, n in zip(names, sizes) if have[g] > n]
        under = [g for g, n in zip(names, sizes) if have[g] < n]
        if not over:
            break
        out[rng.choice(np.flatnonzero(out == over[0]))] = under[0]
    return out


def pairwise_tests(scores: Scores, groups: np.ndarray, cfg: PermutationConfig, kind: str = "weighted_jaccard"
                   ) -> pd.DataFrame:
    """For each pair of groups: their similarity, a permutation p (the two groups' prompts
    relabelled in proportion: stratified_relabel), and the Benjamini–Hochberg adjusted p."""
    from scipy.stats import false_discovery_control

    rng = np.random.default_rng(cfg.seed)
    names = sorted(set(groups))
    rows = []
    for a, b in itertools.combinations(names, 2):
        keep = np.flatnonzero((groups == a) | (groups == b))
        sub = Scores(scores.layers, scores.node_ids, {l: v[keep] for l, v in scores.nodes.items()}, scores.edge_ids,
                     {p: v[keep] for p, v in scores.edges.items()})
        g = groups[keep]
        obs = mean_similarity(sub, g, cfg.n_nodes, cfg.n_edges, [kind], cfg.threshold)[kind]
        null = np.array([mean_similarity(sub, stratified_relabel(g, rng), cfg.n_nodes, cfg.n_edges, [kind],
                                         cfg.threshold)[kind]
                         for _ in range(cfg.n_permutations)])
        null = null[np.isfinite(null)]
        p = float((1 + np.sum(null <= obs)) / (1 + null.size)) if null.size and np.isfinite(obs) else float("nan")
        rows.append({"a": a, "b": b, "similarity": kind, "observed": obs,
                     "null_mean": float(null.mean()) if null.size else float("nan"), "p_value": p,
                     "n_a": int((g == a).sum()), "n_b": int((g == b).sum()), "n_permutations": int(null.size)})
    out = pd.DataFrame(rows)
    if len(out):
        ok = out.p_value.notna()
        out["p_adjusted"] = np.nan
        if ok.any():
            out.loc[ok, "p_adjusted"] = false_discovery_control(out.loc[ok, "p_value"].to_numpy(), method="bh")
        out["significant"] = out.p_adjusted < cfg.alpha
    return out


def verdict(tests: pd.DataFrame, pairwise: pd.DataFrame, alpha: float = 0.05, mixed_ratio: float = 0.5,
            primary: str = "weighted_jaccard") -> dict:
    """Monolithic, modular or mixed, from the ``primary`` similarity's test and the pairwise tests.

    - monolithic: the global test does not reject exchangeable labels (p ≥ alpha);
    - modular: it rejects, and circuits share little: observed / null similarity < ``mixed_ratio``;
    - mixed: it rejects, but circuits keep a shared core (ratio ≥ ``mixed_ratio``), or only some
      pairs differ after correction.
    """
    row = tests.set_index("similarity").loc[primary]
    p, ratio = float(row.p_value), float(row.ratio)
    n_sig = int(pairwise.significant.sum()) if len(pairwise) and "significant" in pairwise else 0
    n_pairs = int(len(pairwise))
    if not np.isfinite(p) or p >= alpha:
        label = "monolithic"
    elif ratio < mixed_ratio and (n_pairs == 0 or n_sig == n_pairs):
        label = "modular"
    else:
        label = "mixed"
    return {
        "verdict": label, "primary_similarity": primary, "alpha": alpha, "mixed_ratio": mixed_ratio,
        "p_value": p, "observed": float(row.observed), "null_mean": float(row.null_mean), "ratio": ratio,
        "effect": float(row.effect), "z": float(row.z), "ci": [float(row.ci_low), float(row.ci_high)],
        "n_permutations": int(row.n_permutations), "n_bootstrap": int(row.n_bootstrap),
        "pairs_significant": n_sig, "pairs": n_pairs,
        "all_similarities": tests.to_dict("records"),
    }
