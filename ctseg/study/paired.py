"""Spread over repeated trainings and paired comparisons against a baseline run.

Why: one training per condition cannot tell a difference between two networks from the
difference between two seeds of one network. Every condition of an experiment is therefore
trained on the same patient folds with the same seeds, and a run is compared with the baseline
pair by pair (same fold, same seed, same validation condition): the fold's test case is shared,
so the pairing removes the case-to-case spread and leaves the run-to-run one.

A difference is called real when the mean of the paired differences is more than twice their
standard deviation (an effect size above 2); the paired t-test and the Wilcoxon signed-rank test
(scipy) are reported beside it. With 3 folds x 3 seeds (9 pairs) that is a deliberately strict
bar: a difference that passes it is not seed noise.
"""

from __future__ import annotations

import math
import warnings
from typing import Hashable, Mapping, Sequence

import numpy as np
from scipy import stats

#: |mean paired difference| above this many sd of the paired differences: a real difference.
REAL_EFFECT = 2.0


def spread(values: Sequence[float]) -> dict:
    """Mean, sample sd (NaN below 2 values) and count of `values`."""
    x = np.asarray(values, dtype=float)
    return {"mean": float(x.mean()) if x.size else math.nan,
            "sd": float(x.std(ddof=1)) if x.size > 1 else math.nan, "n": int(x.size)}


def paired(baseline: Mapping[Hashable, float], other: Mapping[Hashable, float]) -> dict:
    """Compare `other` with `baseline` over the keys (e.g. (fold, seed)) both have.

    Returns mean and sd of other - baseline, the number of pairs, the two-sided p of the paired
    t-test and of the Wilcoxon signed-rank test (NaN where undefined) and the verdict.
    """
    keys = [k for k in baseline if k in other]
    d = np.array([other[k] - baseline[k] for k in keys], dtype=float)
    result = {**{f"diff_{k}": v for k, v in spread(d).items()}, "t_p": math.nan, "wilcoxon_p": math.nan}
    if d.size > 1 and np.any(d != d[0]):
        with warnings.catch_warnings():  # scipy warns about the normal approximation for few pairs
            warnings.simplefilter("ignore")
            result["t_p"] = float(stats.ttest_rel([other[k] for k in keys], [baseline[k] for k in keys]).pvalue)
            if np.any(d != 0):
                result["wilcoxon_p"] = float(stats.wilcoxon(d).pvalue)
    result["verdict"] = verdict(result["diff_mean"], result["diff_sd"], result["diff_n"])
    return result


def verdict(mean: float, sd: float, n: int) -> str:
    """Whether a mean paired difference exceeds the run-to-run spread (see the module docstring)."""
    if n < 2:
        return "too few pairs"
    if mean == 0.0 and sd == 0.0:
        return "identical"
    return "real" if abs(mean) > REAL_EFFECT * sd else "within seed spread"
