"""Times candle-onnx (Quiver's `onnx` family, through kernels/examples/onnx_bench.rs) against
ONNX Runtime on the same graphs and the same inputs, interleaved (see scripts/bench-onnx).

argv: MODELS_DIR/onnx  OUT_DIR  ONNX_BENCH_BINARY

For each graph of the manifest (and MiniLM's encoder, minilm/model.onnx, when
scripts/export-minilm-onnx has made it) and each batch size, a round times Quiver then ONNX
Runtime for SECONDS_PER_RUN each on the same input files; ROUNDS rounds; each run reports the
median of its calls, and the table shows the median of the rounds' medians. ONNX Runtime runs
with intra_op_num_threads = THREADS and inter_op_num_threads = 1, graph optimisations at their
default (all); Quiver with RAYON_NUM_THREADS = THREADS.
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


class Quiver:
    def __init__(self, binary, model):
        self.p = subprocess.Popen(
            [binary, str(model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.ready = json.loads(self.p.stdout.readline())

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
        quiver = Quiver(binary, model)
        session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        ort_feeds = dict(feeds)
        q, o = [], []
        for _ in range(ROUNDS):
            q.append(quiver.time(files))
            o.append(time_ort(session, ort_feeds))
        quiver.close()
        row = {
            "graph": name,
            "batch": batch,
            "candle_onnx_ms": statistics.median(q) * 1e3,
            "onnxruntime_ms": statistics.median(o) * 1e3,
            "candle_onnx_rounds_ms": [x * 1e3 for x in q],
            "onnxruntime_rounds_ms": [x * 1e3 for x in o],
        }
        row["ratio"] = row["candle_onnx_ms"] / row["onnxruntime_ms"]
        results.append(row)
        print(f"{name} batch {batch}: candle-onnx {row['candle_onnx_ms']:.3f} ms, "
              f"onnxruntime {row['onnxruntime_ms']:.3f} ms", flush=True)
    (out_dir / "results.json").write_text(json.dumps(
        {"threads": THREADS, "rounds": ROUNDS, "seconds_per_run": SECONDS,
         "onnxruntime": ort.__version__, "results": results}, indent=2) + "\n")
    lines = [
        f"| graph | batch | candle-onnx (Quiver) ms | ONNX Runtime {ort.__version__} ms | ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r['graph']} | {r['batch']} | {r['candle_onnx_ms']:.3f} | "
                     f"{r['onnxruntime_ms']:.3f} | {r['ratio']:.1f}x |")
    table = "\n".join(lines) + "\n"
    (out_dir / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
