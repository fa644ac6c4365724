"""Side-by-side CPU benchmark of gradient-boosted tree inference (issue 20, point 2); run by
scripts/bench-trees, which says what it needs.

    python bench-trees.py WORK_DIR OUT_DIR QUIVER_BIN

One run: trains the benchmark model (500 trees of depth 8 over 32 features, binary logistic)
with XGBoost and with LightGBM into WORK_DIR, checks every engine's outputs against its
library's predict() on the benchmark rows, then times, at 1, 64 and 4,096 rows per call,
interleaved (ROUNDS rounds; in each round every cell measures every engine back to back, in
an order rotated by the round):

  xgboost   Booster.inplace_predict (nthread=THREADS)             on model.json
  tl2cgen   model.json compiled to a shared library by tl2cgen     (Predictor nthread=THREADS)
  quiver    Quiver's TreeModel::predict (kernels/examples/trees_bench.rs, rayon THREADS)
  lightgbm  Booster.predict (num_threads=THREADS)                 on model.txt
  lleaves   model.txt compiled by lleaves (LLVM)                   (predict n_jobs=THREADS,
            and n_jobs=1 as "lleaves 1 thread": its n_jobs > 1 starts threads per call)
  quiver    as above, on model.txt

Each measurement: warm-up (2 calls and at least 0.1 s), then every call timed on its own for
SECONDS (at least 5 calls); its figure is the median. A cell's figure is the median of its
ROUNDS measurements. Python-side calls include what a caller pays for the call from a numpy
array (tl2cgen: building its DMatrix; lleaves: its conversion to f64).

Writes OUT_DIR/table.md and OUT_DIR/results.json and prints the table. Exits non-zero when
an engine's outputs differ from its library's by more than 1e-5 anywhere on the rows.
"""

import hashlib
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback

import lightgbm as lgb
import numpy as np
import xgboost as xgb

TREES = 500
DEPTH = 8
FEATURES = 32
TRAIN_ROWS = 20_000
BENCH_ROWS = 4096
NAN_SHARE = 0.05
BATCHES = [1, 64, 4096]
TOLERANCE = 1e-5

THREADS = int(os.environ.get("THREADS", "2"))
ROUNDS = int(os.environ.get("ROUNDS", "5"))
SECONDS = float(os.environ.get("SECONDS_PER_RUN", "1"))


def fail(message):
    print(f"bench-trees: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def make_rows(rng, n):
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    x[rng.random((n, FEATURES)) < NAN_SHARE] = np.nan
    return x


def labels(rng, x):
    z = np.nan_to_num(x, nan=0.0)
    s = (
        z[:, 0] * z[:, 1]
        + np.sin(2 * z[:, 2])
        + 0.5 * z[:, 3:8].sum(axis=1)
        - np.abs(z[:, 8]) * z[:, 9]
        + 0.3 * (z[:, 10:20] ** 2).sum(axis=1) / 10
        + 0.2 * z[:, 20:32].sum(axis=1)
    )
    return (s + 0.5 * rng.normal(size=len(s)) > 0.3).astype(np.int32)


def train(work):
    rng = np.random.default_rng(20)
    x_train = make_rows(rng, TRAIN_ROWS)
    y = labels(rng, x_train)
    x = make_rows(rng, BENCH_ROWS)
    x.astype("<f4").tofile(work / "rows.f32")
    t = time.perf_counter()
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": DEPTH, "eta": 0.1, "nthread": THREADS,
         "seed": 1, "tree_method": "hist"},
        xgb.DMatrix(x_train, label=y, nthread=THREADS),
        TREES,
    )
    booster.save_model(work / "model.json")
    xgb_s = time.perf_counter() - t
    t = time.perf_counter()
    booster = lgb.train(
        {"objective": "binary", "num_leaves": 255, "max_depth": DEPTH, "learning_rate": 0.1,
         "num_threads": THREADS, "seed": 1, "verbose": -1, "deterministic": True},
        lgb.Dataset(x_train, label=y),
        TREES,
    )
    booster.save_model(work / "model.txt")
    lgb_s = time.perf_counter() - t
    print(f"bench-trees: trained XGBoost in {xgb_s:.1f} s, LightGBM in {lgb_s:.1f} s",
          flush=True)
    return x, {"xgboost_train_s": xgb_s, "lightgbm_train_s": lgb_s}


def time_calls(call):
    """The scheme of trees_bench.rs: warm-up, then calls timed one by one; the median."""
    start = time.perf_counter()
    warm = 0
    while warm < 2 or time.perf_counter() - start < 0.1:
        call()
        warm += 1
    samples = []
    start = time.perf_counter()
    while len(samples) < 5 or time.perf_counter() - start < SECONDS:
        t = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t)
    return len(samples), statistics.median(samples)


class Quiver:
    """kernels/examples/trees_bench.rs in a child process, driven over stdin."""

    def __init__(self, binary, model, rows):
        self.proc = subprocess.Popen([binary, str(model), str(rows)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            fail(f"{binary} {model} exited without starting (exit {self.proc.wait()})")
        self.info = json.loads(line)

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split()
        if not reply or reply[0] != "ok":
            fail(f"Quiver answered {' '.join(reply) or 'nothing'} to {command!r}")
        return reply[1:]

    def predict(self, path):
        self.ask(f"predict {path}")
        return np.fromfile(path, dtype="<f4")

    def time(self, rows):
        calls, median = self.ask(f"time {rows} {SECONDS}")
        return int(calls), float(median)

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()


def cached_compile(cache, model_file, suffix, build):
    """Compiled libraries are kept under `cache`, keyed by the model file's hash (training is
    deterministic, so a rerun does not compile 500 trees again)."""
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()[:16]
    lib = cache / f"{model_file.stem}-{suffix}-{digest}.so"
    seconds = None
    if not lib.exists():
        tmp = lib.with_suffix(".tmp.so")
        t = time.perf_counter()
        build(tmp)
        seconds = time.perf_counter() - t
        tmp.rename(lib)
    return lib, seconds


def setup_tl2cgen(cache, model_json):
    import tl2cgen
    import treelite

    def build(path):
        model = treelite.frontend.load_xgboost_model(str(model_json))
        tl2cgen.export_lib(model, toolchain="gcc", libpath=str(path),
                           params={"parallel_comp": 2 * THREADS}, nthread=THREADS)

    lib, seconds = cached_compile(cache, model_json, f"tl2cgen{tl2cgen.__version__}", build)
    predictor = tl2cgen.Predictor(str(lib), nthread=THREADS)

    def call(x):
        return predictor.predict(tl2cgen.DMatrix(x, dtype="float32"))

    return {"tl2cgen": call}, {"versions": {"treelite": treelite.__version__, "tl2cgen": tl2cgen.__version__},
                  "compile_s": seconds, "library": str(lib)}


def setup_lleaves(cache, model_txt):
    import lleaves

    version = getattr(lleaves, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("lleaves")

    model = lleaves.Model(model_file=str(model_txt))
    # lleaves caches the compiled object itself: compile() with an existing cache file loads
    # it.
    digest = hashlib.sha256(model_txt.read_bytes()).hexdigest()[:16]
    lib = cache / f"model-lleaves{version}-{digest}.o"
    t = time.perf_counter()
    model.compile(cache=str(lib))
    seconds = time.perf_counter() - t

    # n_jobs > 1 starts a thread pool per call (0.2 ms, against 14 µs for one row on the
    # calling thread), so lleaves on one thread is timed too.
    return {"lleaves": lambda x: model.predict(x, n_jobs=THREADS),
            "lleaves 1 thread": lambda x: model.predict(x, n_jobs=1)}, {"versions": {"lleaves": version}, "compile_or_load_s": seconds,
                  "library": str(lib)}


def check(name, got, want):
    got = np.asarray(got, dtype=np.float64).ravel()
    want = np.asarray(want, dtype=np.float64).ravel()
    if got.shape != want.shape:
        fail(f"{name}: {got.shape[0]} outputs, the library gave {want.shape[0]}")
    diff = float(np.max(np.abs(got - want)))
    if not np.isfinite(diff) or diff > TOLERANCE:
        fail(f"{name}: max |difference| from the library's predict() is {diff:.3g} "
             f"(allowed {TOLERANCE:g})")
    print(f"bench-trees: {name}: max |difference| from the library's predict() {diff:.3g}",
          flush=True)
    return diff


def cpu_model():
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    work, out, quiver_bin = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
    cache = pathlib.Path(sys.argv[4]) if len(sys.argv) > 4 else work
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    x, meta = train(work)
    rows_file = work / "rows.f32"
    model_json, model_txt = work / "model.json", work / "model.txt"

    xgb_booster = xgb.Booster(model_file=str(model_json))
    xgb_booster.set_param({"nthread": THREADS})
    lgb_booster = lgb.Booster(model_file=str(model_txt))
    want_xgb = xgb_booster.predict(xgb.DMatrix(x, nthread=THREADS))
    want_lgb = lgb_booster.predict(x, num_threads=THREADS)

    engines = {}  # (model, engine) -> callable(rows) -> outputs
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "xgboost": xgb.__version__, "lightgbm": lgb.__version__}
    not_run = {}
    parity = {}

    engines[("XGBoost", "xgboost")] = lambda a: xgb_booster.inplace_predict(a)
    engines[("LightGBM", "lightgbm")] = lambda a: lgb_booster.predict(a, num_threads=THREADS)
    parity["xgboost inplace_predict"] = check("xgboost inplace_predict",
                                              xgb_booster.inplace_predict(x), want_xgb)

    for model, name, setup, file, want in [
        ("XGBoost", "tl2cgen", setup_tl2cgen, model_json, want_xgb),
        ("LightGBM", "lleaves", setup_lleaves, model_txt, want_lgb),
    ]:
        try:
            print(f"bench-trees: compiling {file.name} with {name} (cached by the model's hash)",
                  flush=True)
            calls, info = setup(cache, file)
            got = calls[name](x)
        except Exception as e:  # a library that does not install or run here: recorded
            traceback.print_exc()
            not_run[name] = f"{type(e).__name__}: {e}"
            print(f"bench-trees: {name} does not run here, going on without it: {e}",
                  file=sys.stderr, flush=True)
            continue
        versions.update(info.pop("versions"))
        meta[name] = info
        parity[name] = check(name, got, want)
        for variant, call in calls.items():
            engines[(model, variant)] = call

    quivers = {}
    for model, file, want in [("XGBoost", model_json, want_xgb),
                              ("LightGBM", model_txt, want_lgb)]:
        q = Quiver(quiver_bin, file, rows_file)
        quivers[model] = q
        meta[f"quiver {model}"] = q.info
        parity[f"quiver {model}"] = check(f"Quiver on {file.name}",
                                          q.predict(work / "quiver.out.f32"), want)

    # Every engine of a model, Quiver last in the list; the order rotates each round.
    cells = {}  # (rows, model, engine) -> [median seconds per round]
    names = {}
    for (model, engine) in engines:
        names.setdefault(model, []).append(engine)
    for model in names:
        names[model].append("quiver")
    for r in range(ROUNDS):
        t0 = time.perf_counter()
        for rows in BATCHES:
            a = x[:rows]
            for model, order in names.items():
                k = r % len(order)
                for engine in order[k:] + order[:k]:
                    if engine == "quiver":
                        _, median = quivers[model].time(rows)
                    else:
                        fn = engines[(model, engine)]
                        _, median = time_calls(lambda: fn(a))
                    cells.setdefault((rows, model, engine), []).append(median)
        print(f"bench-trees: round {r + 1}/{ROUNDS} took {time.perf_counter() - t0:.1f} s",
              flush=True)
    for q in quivers.values():
        q.close()

    results = []
    for (rows, model, engine), rounds in cells.items():
        results.append({"rows": rows, "model": model, "engine": engine,
                        "median_s": statistics.median(rounds), "round_medians_s": rounds})
    report = {
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(),
                    "quiver_isa": {m: q.info["isa"] for m, q in quivers.items()}},
        "settings": {"threads": THREADS, "rounds": ROUNDS, "seconds_per_run": SECONDS,
                     "trees": TREES, "depth": DEPTH, "features": FEATURES,
                     "train_rows": TRAIN_ROWS, "nan_share": NAN_SHARE},
        "versions": versions, "not_run": not_run, "parity_max_abs_diff": parity,
        "meta": meta, "results": results,
        "when_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = render(report)
    (out / "table.md").write_text(table)
    print(table)


def render(report):
    by = {(r["rows"], r["model"], r["engine"]): r["median_s"] for r in report["results"]}
    lines = [
        "| rows/call | model | engine | µs/call | rows/s | Quiver's speed-up over the best other |",
        "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for rows in BATCHES:
        for model in ["XGBoost", "LightGBM"]:
            engines = [e for (n, m, e) in by if n == rows and m == model]
            others = [by[(rows, model, e)] for e in engines if e != "quiver"]
            for e in engines:
                s = by[(rows, model, e)]
                ratio = ""
                if e == "quiver" and others:
                    ratio = f"{min(others) / s:.2f}"
                label = "**Quiver**" if e == "quiver" else e
                lines.append(f"| {rows} | {model} | {label} | {s * 1e6:,.1f} | "
                             f"{rows / s:,.0f} | {ratio} |")
    s = report["settings"]
    notes = [
        "",
        f"{s['trees']} trees of depth {s['depth']} over {s['features']} features "
        f"(binary logistic), {s['threads']} threads per engine, median of {s['rounds']} "
        f"rounds of {s['seconds_per_run']} s per engine and cell; speed-up = the best other "
        "engine's µs/call / Quiver's (> 1: Quiver is faster).",
        f"CPU: {report['machine']['cpu']}, nproc {report['machine']['nproc']}; Quiver's walk: "
        + ", ".join(f"{m} {isa}" for m, isa in report["machine"]["quiver_isa"].items()) + ".",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
    ]
    for name, why in report["not_run"].items():
        notes.append(f"Not run: {name} ({why}).")
    return "\n".join(lines + notes) + "\n"


if __name__ == "__main__":
    main()
