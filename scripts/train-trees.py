"""Trains the small tree models of kernels/tests/trees.rs and writes, next to them, the
rows they are checked on and the libraries' own predictions (see scripts/train-trees).

Output directory (argv[1]):

  rows.f32                10,000 rows x FEATURES, little-endian f32, 5% NaN in every feature
  NAME.json / NAME.txt    XGBoost Booster.save_model / LightGBM Booster.save_model
  NAME.pred.f64           the library's predict() on rows.f32, little-endian f64, [n] or [n, K]
  NAME.margin.f64         its raw scores (output_margin=True / raw_score=True)
  manifest.json           what each file is (read by the tests)

Models that Quiver must refuse at load time (a categorical split, a linear tree, an unknown
objective) are written too, listed under "refused" with the word the error must name.
"""

import json
import pathlib
import sys
import time

import lightgbm as lgb
import numpy as np
import xgboost as xgb

ROWS = 10_000
TRAIN_ROWS = 8_000
FEATURES = 12
CLASSES = 4
NAN_SHARE = 0.05
# Features 0-5 have NaN in the training rows too; 6-11 have none there, so LightGBM gives their
# splits missing type None (NaN is then read as 0.0) and the tests cover all three types.
TRAIN_NAN_FEATURES = 6


def make_rows(rng, n, nan_features):
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    # A sparse feature (exact zeros) for LightGBM's Zero missing type and zero bins.
    x[rng.random(n) < 0.4, 3] = 0.0
    x[:, 7] = np.round(x[:, 7] * 4) / 4  # few distinct values: ties at thresholds
    mask = rng.random((n, FEATURES)) < NAN_SHARE
    mask[:, nan_features:] = False
    x[mask] = np.nan
    return x


def scores(x):
    z = np.nan_to_num(x, nan=0.3)
    return np.stack(
        [
            z[:, 0] + 0.5 * z[:, 1] * z[:, 2] - z[:, 3],
            np.sin(z[:, 4]) + z[:, 5] - 0.3 * z[:, 6],
            z[:, 7] * z[:, 8] + 0.2 * z[:, 9],
            np.abs(z[:, 10]) - z[:, 11] + 0.1 * z[:, 0],
        ],
        axis=1,
    )


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20)
    x_train = make_rows(rng, TRAIN_ROWS, TRAIN_NAN_FEATURES)
    s = scores(x_train) + 0.3 * rng.normal(size=(TRAIN_ROWS, CLASSES))
    y_reg = (s[:, 0] + s[:, 1]).astype(np.float32)
    y_bin = (s[:, 0] - s[:, 1] > 0.2).astype(np.int32)
    y_multi = np.argmax(s, axis=1).astype(np.int32)
    # The rows the tests check: NaN in every feature, also where training had none.
    x = make_rows(rng, ROWS, FEATURES)
    x.astype("<f4").tofile(out / "rows.f32")

    models = []

    def record(name, file, library, objective, classes, pred, margin):
        pred = np.asarray(pred, dtype="<f8")
        margin = np.asarray(margin, dtype="<f8")
        pred.tofile(out / f"{name}.pred.f64")
        margin.tofile(out / f"{name}.margin.f64")
        models.append(
            {
                "name": name,
                "file": file,
                "library": library,
                "objective": objective,
                "classes": classes,
                "pred_shape": list(pred.shape),
                "margin_shape": list(margin.shape),
            }
        )

    # One thread each: training is a few seconds single-threaded, and on two shared cores a
    # second thread made it five times slower (it waited on the other).
    xgb_common = {"max_depth": 6, "eta": 0.1, "nthread": 1, "seed": 1, "tree_method": "hist"}
    dx = xgb.DMatrix(x, nthread=1)
    for name, objective, label, extra, rounds in [
        ("xgb_binary", "binary:logistic", y_bin, {}, 60),
        ("xgb_regression", "reg:squarederror", y_reg, {}, 60),
        ("xgb_softprob", "multi:softprob", y_multi, {"num_class": CLASSES}, 20),
        ("xgb_softmax", "multi:softmax", y_multi, {"num_class": CLASSES}, 20),
    ]:
        booster = xgb.train(
            {"objective": objective, **xgb_common, **extra},
            xgb.DMatrix(x_train, label=label, nthread=1),
            rounds,
        )
        file = f"{name}.json"
        booster.save_model(out / file)
        booster = xgb.Booster(model_file=str(out / file))
        margin = booster.predict(dx, output_margin=True)
        if objective == "multi:softmax":
            # predict() gives class indices; Quiver serves the probabilities, which are the
            # library's own softprob on the same trees.
            classes_pred = booster.predict(dx)
            np.asarray(classes_pred, dtype="<f8").tofile(out / f"{name}.class.f64")
            booster.set_param({"objective": "multi:softprob"})
        pred = booster.predict(dx)
        record(name, file, "xgboost", objective, extra.get("num_class", 1), pred, margin)

    lgb_common = {"num_leaves": 31, "learning_rate": 0.1, "num_threads": 1, "seed": 1,
                  "verbose": -1, "deterministic": True}
    for name, objective, label, extra, rounds in [
        ("lgb_binary", "binary", y_bin, {}, 60),
        ("lgb_regression", "regression", y_reg, {}, 60),
        ("lgb_multiclass", "multiclass", y_multi, {"num_class": CLASSES}, 20),
        # zero_as_missing: every split gets missing type Zero (0 and NaN take the default).
        ("lgb_regression_zero", "regression", y_reg, {"zero_as_missing": True}, 40),
    ]:
        booster = lgb.train(
            {"objective": objective, **lgb_common, **extra},
            lgb.Dataset(x_train, label=label),
            rounds,
        )
        file = f"{name}.txt"
        booster.save_model(out / file)
        booster = lgb.Booster(model_file=str(out / file))
        pred = booster.predict(x)
        margin = booster.predict(x, raw_score=True)
        record(name, file, "lightgbm", objective, extra.get("num_class", 1), pred, margin)

    refused = []
    xc = x_train.copy()
    xc[:, 2] = np.floor(np.abs(np.nan_to_num(xc[:, 2])) * 3) % 5
    booster = lgb.train(
        {"objective": "regression", **lgb_common, "min_data_per_group": 5},
        lgb.Dataset(xc, label=y_reg + xc[:, 2], categorical_feature=[2]),
        5,
    )
    booster.save_model(out / "refused_lgb_categorical.txt")
    refused.append({"file": "refused_lgb_categorical.txt", "names": "categorical"})
    booster = lgb.train(
        {"objective": "regression", **lgb_common, "linear_tree": True},
        lgb.Dataset(x_train, label=y_reg),
        3,
    )
    booster.save_model(out / "refused_lgb_linear.txt")
    refused.append({"file": "refused_lgb_linear.txt", "names": "linear"})
    booster = xgb.train(
        {"objective": "count:poisson", **xgb_common},
        xgb.DMatrix(x_train, label=np.abs(y_reg)),
        3,
    )
    booster.save_model(out / "refused_xgb_poisson.json")
    refused.append({"file": "refused_xgb_poisson.json", "names": "count:poisson"})

    manifest = {
        "rows": ROWS,
        "features": FEATURES,
        "x": "rows.f32",
        "xgboost": xgb.__version__,
        "lightgbm": lgb.__version__,
        "models": models,
        "refused": refused,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    start = time.monotonic()
    main()
    print(f"train-trees: trained and predicted in {time.monotonic() - start:.1f} s")
