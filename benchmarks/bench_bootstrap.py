"""How fast is the vectorised bootstrap of `fxscore eval`, against the obvious loop?

Prints, for a few set sizes, the time of `fxscore.metrics.bootstrap` (1000 resamples, two
operating points, ROC-AUC and AP) and of a plain loop over resamples calling scikit-learn,
measured in the same run, with their ratio; goal: < ~2 s for 1000 resamples of a few thousand
predictions. Also checks that both give intervals within a bootstrap's noise of each other.

    python benchmarks/bench_bootstrap.py                # ~1 min on 2 cores
    python benchmarks/bench_bootstrap.py --sizes 3000 --loop-resamples 200
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from fxscore import metrics as M


def loop_bootstrap(t: np.ndarray, s: np.ndarray, threshold: float, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    auc, ap, sens = [], [], []
    for _ in range(n):
        i = rng.integers(0, t.size, t.size)
        ti, si = t[i], s[i]
        if 0 < ti.sum() < ti.size:
            auc.append(roc_auc_score(ti, si))
            ap.append(average_precision_score(ti, si))
            sens.append(((si >= threshold) & (ti == 1)).sum() / ti.sum())
    return {k: np.percentile(v, [2.5, 97.5]) for k, v in
            (("roc_auc", auc), ("average_precision", ap), ("sensitivity", sens))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 3000, 10000])
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--loop-resamples", type=int, default=1000,
                    help="resamples for the scikit-learn loop (its time is scaled up)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    print(f"{'N':>7} {'vectorised s':>13} {'grouped s':>10} {'sklearn loop s':>15} {'ratio':>7}"
          f"   AUC CI vectorised / loop")
    for n in args.sizes:
        t = (rng.random(n) < 0.4).astype(int)
        s = np.clip(rng.normal(0.35 + 0.3 * t, 0.2), 0, 1).round(3)  # ties, like real scores
        thresholds = {"model": 0.5, "target": M.threshold_for_sensitivity(t, s, 0.95)}
        start = time.perf_counter()
        fast = M.bootstrap(t, s, thresholds, n_resamples=args.resamples, seed=0)
        vec = time.perf_counter() - start
        start = time.perf_counter()
        M.bootstrap(t, s, thresholds, n_resamples=args.resamples, seed=0,
                    groups=np.arange(n) // 5)
        grouped = time.perf_counter() - start
        start = time.perf_counter()
        slow = loop_bootstrap(t, s, 0.5, args.loop_resamples, 0)
        loop = (time.perf_counter() - start) * args.resamples / args.loop_resamples
        a, b = fast["roc_auc"], slow["roc_auc"]
        print(f"{n:>7} {vec:>13.3f} {grouped:>10.3f} {loop:>15.2f} {loop / vec:>6.0f}x"
              f"   [{a['low']:.3f}, {a['high']:.3f}] / [{b[0]:.3f}, {b[1]:.3f}]")


if __name__ == "__main__":
    main()
