"""The fraud-scoring demo model (scripts/fraud-demo): gradient-boosted trees on synthetic
card transactions, as a fraud team would train them with XGBoost.

  python scripts/fraud-demo.py OUT_DIR

writes OUT_DIR/model.json (XGBoost Booster.save_model: binary:logistic, 30 features),
OUT_DIR/model-settings.json (the same model for MLServer's xgboost runtime), and
OUT_DIR/summary.json (rows, positive share, trees, held-out AUC, training seconds).

The transactions: 30 features (amount, hour, merchant and device risk, distance from home,
velocity counts, account age, ... and noise), about 0.5% of them fraud, the label drawn from
a logistic model with interactions so that trees have something to find. Deterministic (seed).
"""

import json
import pathlib
import sys
import time

import numpy as np
import xgboost as xgb

ROWS = 60_000
FEATURES = 30
TREES = 300
DEPTH = 6
SEED = 7


def transactions(rng, n):
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    amount = rng.lognormal(mean=3.5, sigma=1.2, size=n)
    x[:, 0] = np.log1p(amount)                        # log amount
    x[:, 1] = rng.integers(0, 24, size=n)             # hour of day
    x[:, 2] = rng.beta(1, 12, size=n)                 # merchant risk score
    x[:, 3] = rng.beta(1, 20, size=n)                 # device risk score
    x[:, 4] = np.log1p(rng.exponential(20, size=n))   # log km from home
    x[:, 5] = rng.poisson(1.5, size=n)                # transactions in the last hour
    x[:, 6] = rng.poisson(6, size=n)                  # transactions in the last day
    x[:, 7] = np.log1p(rng.exponential(900, size=n))  # log account age, days
    x[:, 8] = rng.random(n) < 0.08                    # card not present
    x[:, 9] = rng.random(n) < 0.03                    # foreign merchant
    night = (x[:, 1] < 5).astype(np.float32)
    # The log-odds of fraud: about 0.5% of transactions; the best possible AUC is about 0.93.
    z = -12.0 + 1.6 * (
        0.55 * x[:, 0]
        + 9.0 * x[:, 2]
        + 12.0 * x[:, 3]
        + 0.35 * x[:, 4]
        + 0.45 * np.maximum(x[:, 5] - 2, 0)
        - 0.25 * x[:, 7]
        + 1.1 * x[:, 8] * night
        + 1.4 * x[:, 9] * (x[:, 0] > 5)
        + 0.3 * x[:, 10] * x[:, 11])
    y = rng.random(n) < 1 / (1 + np.exp(-z))
    return x, y.astype(np.float32)


def auc(y, p):
    order = np.argsort(p)
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    x, y = transactions(rng, ROWS)
    split = ROWS * 4 // 5
    t0 = time.perf_counter()
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": DEPTH, "eta": 0.1, "nthread": 2,
         "tree_method": "hist", "scale_pos_weight": 20, "seed": SEED},
        xgb.DMatrix(x[:split], label=y[:split]),
        num_boost_round=TREES,
    )
    seconds = time.perf_counter() - t0
    booster.save_model(str(out / "model.json"))
    held = booster.inplace_predict(x[split:])
    summary = {
        "rows": ROWS, "features": FEATURES, "positive_share": float(y.mean()),
        "trees": TREES, "depth": DEPTH, "held_out_auc": auc(y[split:], held),
        "training_seconds": round(seconds, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "model-settings.json").write_text(json.dumps({
        "name": "fraud",
        "implementation": "mlserver_xgboost.XGBoostModel",
        "parameters": {"uri": "./model.json", "version": "1"},
    }, indent=2) + "\n")
    print(f"fraud-demo: {ROWS} transactions, {100 * summary['positive_share']:.2f}% fraud, "
          f"{TREES} trees of depth {DEPTH} in {seconds:.1f} s, held-out AUC "
          f"{summary['held_out_auc']:.3f}; model in {out}/model.json")


if __name__ == "__main__":
    main()
