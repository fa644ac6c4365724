"""Times Quiver's `onnx` family on both its engines (kernels/examples/onnx_bench.rs: ONNX
Runtime through `ort`, and candle-onnx) against ONNX Runtime from Python, on the same graphs
and the same inputs, interleaved (see scripts/bench-onnx).

argv: MODELS_DIR/onnx  OUT_DIR  ONNX_BENCH_BINARY

For each graph of the manifest (and MiniLM's encoder, minilm/model.onnx, when
scripts/export-minilm-onnx has made it) and each batch size, a round times Quiver on ONNX
Runtime, Quiver on candle-onnx, then ONNX Runtime from Python, for SECONDS_PER_RUN each on the
same input files; ROUNDS rounds; each run reports the median of its calls, and the table shows
the median of the rounds' medians. ONNX Runtime (Python, and Quiver's session) runs with
intra_op_num_threads = THREADS and inter_op_num_threads = 1, graph optimisations at all;
Quiver with RAYON_NUM_THREADS = THREADS (its session's intra-op threads, and candle's pool).
Quiver's ONNX Runtime is the library at ORT_DYLIB_PATH (the same wheel's, from
scripts/bench-onnx).
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys

import numpy as np
import onnxruntime as ort

ROUNDS = int(os.environ.get("ROUNDS", "5"))
SECONDS = float(os.environ.get("SECONDS_PER_RUN", "1"))
THREADS = int(os.environ.get("THREADS", "2"))
BATCHES = [int(b) for b in os.environ.get("BATCHES", "1 64").split()]
MINILM_TOKENS = int(os.environ.get("MINILM_TOKENS", "32"))


ENGINES = ["onnxruntime", "candle"]


class Quiver:
    def __init__(self, binary, model, engine):
        self.p = subprocess.Popen(
            [binary, str(model), engine], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True
        )
        self.ready = json.loads(self.p.stdout.readline())
        if self.ready.get("engine") != engine:
            raise RuntimeError(f"onnx_bench ran {self.ready} for engine {engine}")

    def time(self, inputs):
        args = " ".join(f"{path}:{'x'.join(map(str, shape))}" for path, shape in inputs)
        self.p.stdin.write(f"time {SECONDS} {args}\n")
        self.p.stdin.flush()
        words = self.p.stdout.readline().split()
        if words[:1] != ["ok"]:
            raise RuntimeError(f"onnx_bench: {' '.join(words)}")
        return float(words[2])

    def close(self):
        self.p.stdin.write("quit\n")
        self.p.stdin.flush()
        self.p.wait()


def time_ort(session, feeds):
    names = [o.name for o in session.get_outputs()]
    t0 = ort_clock()
    calls = 0
    while calls < 2 or ort_clock() - t0 < 0.1:
        session.run(names, feeds)
        calls += 1
    times = []
    begin = ort_clock()
    while len(times) < 5 or ort_clock() - begin < SECONDS:
        t = ort_clock()
        session.run(names, feeds)
        times.append(ort_clock() - t)
    return statistics.median(times)


def ort_clock():
    import time

    return time.perf_counter()


def cases(src, work):
    """(graph name, model path, batch, [(input name, array)])."""
    manifest = json.loads((src / "manifest.json").read_text())
    rng = np.random.default_rng(7)
    out = []
    for name, case in manifest["graphs"].items():
        for batch in BATCHES:
            feeds = []
            for i in case["inputs"]:
                shape = [batch] + i["shape"][1:]
                feeds.append((i["name"], rng.normal(size=shape).astype(np.float32)))
            out.append((name, src / case["model"], batch, feeds))
    minilm = src / "minilm" / "model.onnx"
    if minilm.is_file():
        session = ort.InferenceSession(str(minilm), providers=["CPUExecutionProvider"])
        for batch in BATCHES:
            feeds = []
            for i in session.get_inputs():
                if i.name == "input_ids":
                    v = rng.integers(1000, 20000, size=(batch, MINILM_TOKENS))
                elif i.name == "attention_mask":
                    v = np.ones((batch, MINILM_TOKENS))
                else:
                    v = np.zeros((batch, MINILM_TOKENS))
                feeds.append((i.name, v.astype(np.int64)))
            out.append((f"minilm ({MINILM_TOKENS} tokens)", minilm, batch, feeds))
    return out


def main():
    src, out_dir, binary = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
    work = out_dir / "inputs"
    work.mkdir(parents=True, exist_ok=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    results = []
    for name, model, batch, feeds in cases(src, work):
        files = []
        for k, (input_name, value) in enumerate(feeds):
            f = work / f"{model.stem}.{batch}.{k}.bin"
            value.astype(value.dtype.newbyteorder("<")).tofile(f)
            files.append((f, value.shape))
        quivers = {e: Quiver(binary, model, e) for e in ENGINES}
        session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        ort_feeds = dict(feeds)
        q = {e: [] for e in ENGINES}
        o = []
        for _ in range(ROUNDS):
            for e in ENGINES:
                q[e].append(quivers[e].time(files))
            o.append(time_ort(session, ort_feeds))
        for quiver in quivers.values():
            quiver.close()
        row = {"graph": name, "batch": batch}
        for e in ENGINES:
            row[f"quiver_{e}_ms"] = statistics.median(q[e]) * 1e3
            row[f"quiver_{e}_rounds_ms"] = [x * 1e3 for x in q[e]]
        row["onnxruntime_python_ms"] = statistics.median(o) * 1e3
        row["onnxruntime_python_rounds_ms"] = [x * 1e3 for x in o]
        for e in ENGINES:
            row[f"quiver_{e}_ratio"] = row[f"quiver_{e}_ms"] / row["onnxruntime_python_ms"]
        # The names scripts/bench-onnx-engines reads.
        row["candle_onnx_ms"] = row["quiver_candle_ms"]
        row["onnxruntime_ms"] = row["onnxruntime_python_ms"]
        results.append(row)
        print(f"{name} batch {batch}: Quiver-ORT {row['quiver_onnxruntime_ms']:.3f} ms, "
              f"Quiver-candle {row['quiver_candle_ms']:.3f} ms, "
              f"onnxruntime (Python) {row['onnxruntime_python_ms']:.3f} ms", flush=True)
    (out_dir / "results.json").write_text(json.dumps(
        {"threads": THREADS, "rounds": ROUNDS, "seconds_per_run": SECONDS,
         "onnxruntime": ort.__version__, "results": results}, indent=2) + "\n")
    lines = [
        f"| graph | batch | Quiver-ORT ms | Quiver-candle ms | ONNX Runtime {ort.__version__} "
        "(Python) ms | Quiver-ORT / Python | Quiver-candle / Python |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r['graph']} | {r['batch']} | {r['quiver_onnxruntime_ms']:.3f} | "
                     f"{r['quiver_candle_ms']:.3f} | {r['onnxruntime_python_ms']:.3f} | "
                     f"{r['quiver_onnxruntime_ratio']:.2f}x | {r['quiver_candle_ratio']:.1f}x |")
    table = "\n".join(lines) + "\n"
    (out_dir / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
