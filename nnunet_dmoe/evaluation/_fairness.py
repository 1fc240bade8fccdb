"""Group means, equity-scaled (ES) metrics, worst group and percentile-bootstrap CIs over cases.

Layout after fairlearn's ``MetricFrame`` (``metrics/_metric_frame.py``, ``_bootstrap.py``): a keyword-only
:class:`FairnessFrame` computes everything once and exposes ``overall`` / ``by_group`` properties with ``*_ci`` twins
aligned with ``ci_quantiles``. The bootstrap is a set of pure functions: one seed gives one seed per resample, each
resample draws cases with replacement, and every statistic is recomputed from the resample's case counts. A group
absent from a resample has a NaN mean there; quantiles use ``np.nanquantile``.

ES-M (FEBS, Tian et al., ICLR 2024) = M_all / (1 + sum_g |M_g - M_all|), M the mean of per-case scores, M_all over
all cases (unknown attribute included), g over the known groups that have cases.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from nnunet_dmoe.evaluation._cases import UNKNOWN_GROUP

DEFAULT_CI_QUANTILES = (0.025, 0.975)

_BOOT_WITHOUT_QUANTILES = "n_boot and ci_quantiles must be given together (got n_boot={n_boot}, ci_quantiles={q})"
_BAD_N_BOOT = "n_boot (-bootstrap) must be a whole number >= 1, got {value!r}"
_BAD_QUANTILES = "ci_quantiles must be numbers in [0, 1], got {value!r}"
_NO_CI = "This FairnessFrame was built without n_boot / ci_quantiles, so it has no confidence intervals."
_LENGTHS = "scores[{metric!r}] has {n} values but there are {n_groups} group entries (one per case)"
_NOT_A_LEVEL = ("groups has entries that are neither a level of {levels} nor {unknown!r}: {bad}. Add them to "
                  "levels or map them to None.")
_NO_CASES = "FairnessFrame needs at least one case"


def resample_seeds(seed: Optional[int], n_boot: int) -> np.ndarray:
    """One seed per resample, drawn from ``seed`` (resample ``b`` does not depend on ``n_boot``).

    >>> resample_seeds(0, 3).tolist() == resample_seeds(0, 5)[:3].tolist()
    True
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(_BAD_N_BOOT.format(value=n_boot))
    return np.random.default_rng(seed).integers(0, np.iinfo(np.uint32).max, size=int(n_boot), dtype=np.uint64)


def resample_counts(n_cases: int, seeds: Sequence[int]) -> np.ndarray:
    """``(len(seeds), n_cases)`` matrix: how often each case is drawn in each resample (``n_cases`` draws with
    replacement, one generator per seed)."""
    counts = np.empty((len(seeds), n_cases), dtype=np.float64)
    for b, s in enumerate(seeds):
        counts[b] = np.bincount(np.random.default_rng(int(s)).integers(0, n_cases, size=n_cases), minlength=n_cases)
    return counts


def weighted_means(weights: np.ndarray, scores: np.ndarray, members: np.ndarray) -> np.ndarray:
    """NaN-aware means of ``scores`` over each column of ``members`` for each row of ``weights``.

    ``weights`` (B, N) case counts, ``scores`` (N,), ``members`` (N, G) 0/1. Returns (B, G); a mean over no case
    (or only NaN scores) is NaN. With ``weights`` all ones this is ``np.nanmean`` per group.
    """
    valid = ~np.isnan(scores)
    filled = np.where(valid, scores, 0.0)
    sums = weights @ (members * filled[:, None])
    counts = weights @ (members * valid[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.where(counts > 0, counts, 1), np.nan)


def equity_scaled(overall: np.ndarray, group_means: np.ndarray) -> np.ndarray:
    """ES = overall / (1 + sum_g |group_g - overall|), row-wise; NaN where any group mean is NaN.

    >>> float(equity_scaled(np.array([0.8]), np.array([[0.9, 0.7]]))[0])
    0.6666666666666666
    """
    overall = np.asarray(overall, dtype=float)
    group_means = np.asarray(group_means, dtype=float)
    return overall / (1.0 + np.abs(group_means - overall[..., None]).sum(axis=-1))


def worst_of(group_means: Mapping[str, float], higher_is_better: bool) -> Optional[str]:
    """Level with the lowest (``higher_is_better``) or highest mean; NaN means are skipped; ``None`` if all are."""
    items = [(lv, m) for lv, m in group_means.items() if not np.isnan(m)]
    if not items:
        return None
    pick = min if higher_is_better else max
    return pick(items, key=lambda kv: kv[1])[0]


def _nanquantiles(samples: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """``np.nanquantile`` along axis 0; all-NaN columns give NaN without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(samples, quantiles, axis=0)


class FairnessFrame:
    """Per-group means, equity-scaled metrics and worst group of per-case scores, with bootstrap CIs.

    Parameters
    ----------
    scores : mapping
        Metric name -> per-case scores (one value per case; NaN allowed and skipped by the means).
    groups : sequence
        Group of each case: a level, or ``None`` / ``"unknown"`` for an unknown attribute.
    levels : sequence of str
        The known levels, in report order. Levels without cases are reported with n=0 and NaN means.
    higher_is_better : mapping, optional
        Metric -> bool. ES is computed only for higher-is-better metrics; worst group is the min for those and
        the max for the others. Default: every metric is higher-is-better.
    n_boot : int, optional
        Bootstrap resamples; give together with ``ci_quantiles``.
    ci_quantiles : sequence of float, optional
        Quantiles of the bootstrap distribution to report, e.g. ``(0.025, 0.975)``.
    random_state : int, optional
        Seed of the bootstrap.

    Examples
    --------
    >>> ff = FairnessFrame(scores={"Dice": [0.9, 0.7, 0.6, 0.8]}, groups=["a", "a", "b", None], levels=["a", "b", "c"])
    >>> round(ff.overall["Dice"], 6), round(ff.by_group["a"]["Dice"], 6), ff.group_sizes
    (0.75, 0.8, {'a': 2, 'b': 1, 'c': 0, 'unknown': 1})
    >>> round(ff.es["Dice"], 6), ff.worst_group  # 0.75 / (1 + |0.8 - 0.75| + |0.6 - 0.75|)
    (0.625, {'Dice': 'b'})
    """

    def __init__(self, *, scores: Mapping[str, Sequence[float]], groups: Sequence[Optional[str]],
                 levels: Sequence[str], higher_is_better: Optional[Mapping[str, bool]] = None,
                 n_boot: Optional[int] = None, ci_quantiles: Optional[Sequence[float]] = None,
                 random_state: Optional[int] = None):
        if (n_boot is None) != (ci_quantiles is None):
            raise ValueError(_BOOT_WITHOUT_QUANTILES.format(n_boot=n_boot, q=ci_quantiles))
        groups = [UNKNOWN_GROUP if g is None else str(g) for g in groups]
        if not groups:
            raise ValueError(_NO_CASES)
        self._levels = [str(lv) for lv in levels]
        bad = sorted({g for g in groups if g not in self._levels and g != UNKNOWN_GROUP})
        if bad:
            raise ValueError(_NOT_A_LEVEL.format(levels=self._levels, unknown=UNKNOWN_GROUP, bad=bad))
        self._metrics = list(scores)
        self._scores = {}
        for m in self._metrics:
            s = np.asarray(scores[m], dtype=float)
            if s.shape != (len(groups),):
                raise ValueError(_LENGTHS.format(metric=m, n=s.size, n_groups=len(groups)))
            self._scores[m] = s
        self._higher = {m: bool((higher_is_better or {}).get(m, True)) for m in self._metrics}
        # report order: the levels, then "unknown" when some case has no known attribute
        self._group_names = self._levels + ([UNKNOWN_GROUP] if UNKNOWN_GROUP in groups else [])
        members = np.array([[g == name for name in self._group_names] for g in groups], dtype=float)
        self._sizes = {name: int(members[:, j].sum()) for j, name in enumerate(self._group_names)}
        # ES and worst group: known levels that have cases
        self._es_groups = [j for j, name in enumerate(self._levels) if self._sizes[name] > 0]
        self._members = np.concatenate([np.ones((len(groups), 1)), members], axis=1)  # column 0 = all cases

        self._point = self._statistics(np.ones((1, len(groups))))
        self.n_boot, self.random_state = n_boot, random_state
        self.ci_quantiles = None if ci_quantiles is None else [float(q) for q in ci_quantiles]
        self._ci = None
        if n_boot is not None:
            if any(not 0 <= q <= 1 for q in self.ci_quantiles):
                raise ValueError(_BAD_QUANTILES.format(value=ci_quantiles))
            samples = self._statistics(resample_counts(len(groups), resample_seeds(random_state, n_boot)))
            self._ci = {m: {k: _nanquantiles(v, self.ci_quantiles) for k, v in stats.items()}
                        for m, stats in samples.items()}

    def _statistics(self, weights: np.ndarray) -> Dict[str, Dict[str, np.ndarray]]:
        """Every statistic for each row of case weights: {metric: {"overall": (B,), "groups": (B, G), "es": (B,)}}."""
        out = {}
        for m in self._metrics:
            means = weighted_means(weights, self._scores[m], self._members)
            stats = {"overall": means[:, 0], "groups": means[:, 1:]}
            if self._higher[m]:
                stats["es"] = equity_scaled(means[:, 0], means[:, 1:][:, self._es_groups])
            out[m] = stats
        return out

    # ---- point estimates -------------------------------------------------------------------------------------
    @property
    def metrics(self) -> List[str]:
        return list(self._metrics)

    @property
    def groups(self) -> List[str]:
        """Group names in report order: the levels, then ``"unknown"`` if any case has an unknown attribute."""
        return list(self._group_names)

    @property
    def group_sizes(self) -> Dict[str, int]:
        return dict(self._sizes)

    @property
    def overall(self) -> Dict[str, float]:
        """Mean of the per-case scores over all cases (unknown attribute included), per metric."""
        return {m: float(self._point[m]["overall"][0]) for m in self._metrics}

    @property
    def by_group(self) -> Dict[str, Dict[str, float]]:
        """``{group: {metric: mean}}``; NaN for a group without cases."""
        return {g: {m: float(self._point[m]["groups"][0, j]) for m in self._metrics}
                for j, g in enumerate(self._group_names)}

    @property
    def es(self) -> Dict[str, float]:
        """Equity-scaled value of each higher-is-better metric."""
        return {m: float(self._point[m]["es"][0]) for m in self._metrics if self._higher[m]}

    def _known_means(self, metric: str) -> Dict[str, float]:
        return {self._levels[j]: float(self._point[metric]["groups"][0, j]) for j in self._es_groups}

    @property
    def worst_group(self) -> Dict[str, Optional[str]]:
        """Known level with the lowest mean (highest for lower-is-better metrics such as HD95)."""
        return {m: worst_of(self._known_means(m), self._higher[m]) for m in self._metrics}

    def group_min(self) -> Dict[str, float]:
        """Lowest mean over the known levels with cases, per metric."""
        return {m: float(np.nanmin(list(self._known_means(m).values()) or [np.nan])) for m in self._metrics}

    def group_max(self) -> Dict[str, float]:
        """Highest mean over the known levels with cases, per metric."""
        return {m: float(np.nanmax(list(self._known_means(m).values()) or [np.nan])) for m in self._metrics}

    # ---- confidence intervals (lists aligned with ci_quantiles) -------------------------------------------------
    def _require_ci(self):
        if self._ci is None:
            raise RuntimeError(_NO_CI)

    @property
    def overall_ci(self) -> List[Dict[str, float]]:
        self._require_ci()
        return [{m: float(self._ci[m]["overall"][i]) for m in self._metrics} for i in range(len(self.ci_quantiles))]

    @property
    def by_group_ci(self) -> List[Dict[str, Dict[str, float]]]:
        self._require_ci()
        return [{g: {m: float(self._ci[m]["groups"][i, j]) for m in self._metrics}
                 for j, g in enumerate(self._group_names)} for i in range(len(self.ci_quantiles))]

    @property
    def es_ci(self) -> List[Dict[str, float]]:
        self._require_ci()
        return [{m: float(self._ci[m]["es"][i]) for m in self._metrics if self._higher[m]}
                for i in range(len(self.ci_quantiles))]


__all__ = ["FairnessFrame", "DEFAULT_CI_QUANTILES", "resample_seeds", "resample_counts", "weighted_means",
           "equity_scaled", "worst_of"]
