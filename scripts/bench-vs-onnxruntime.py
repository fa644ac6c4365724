"""The Python side of scripts/bench-vs-onnxruntime (see there): ONNX Runtime in this process,
Quiver's engine over the example's stdin, Quiver served over REST; one table."""

import argparse
import http.client
import json
import os
import platform
import subprocess
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

# The texts of kernels/examples/embedding_throughput.rs: row r, word w -> WORDS[(r + 7w) % 12].
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "near", "river", "bank"]


def texts(batch, tokens):
    return [" ".join(WORDS[(r + w * 7) % len(WORDS)] for w in range(tokens - 2)) for r in range(batch)]


def timed(call, seconds):
    """Median seconds per call after a warm-up (2 calls, 0.5 s), over `seconds` (>= 3 calls)."""
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < 0.5:
        call()
        n += 1
    times, t0 = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def median(xs):
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


class Ort:
    def __init__(self, path, threads):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def embed(self, feeds):
        (hidden,) = self.session.run(["last_hidden_state"], {k: feeds[k] for k in self.inputs})
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def feeds_for(tok, batch, tokens):
    enc = tok.encode_batch(texts(batch, tokens))
    assert all(len(e.ids) == tokens for e in enc), "the texts do not tokenize to the cell's length"
    ids = np.array([e.ids for e in enc], np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }


def main():
    ap = argparse.ArgumentParser()
    for a in ("model-dir", "onnx-dir", "engine-bin", "cells", "out"):
        ap.add_argument(f"--{a}", default="")
    for a in ("threads", "rounds", "served", "port", "int8"):
        ap.add_argument(f"--{a}", type=int)
    ap.add_argument("--seconds", type=float)
    args = ap.parse_args()
    cells = [tuple(int(x) for x in c.split(":")) for c in args.cells.split()]

    tok = Tokenizer.from_file(f"{args.model_dir}/tokenizer.json")
    tok.no_padding()
    tok.no_truncation()
    files = {"ort16": "model.onnx", "ort18": "model.default-opset.onnx"}
    if args.int8:
        # ONNX Runtime's own dynamic quantization of the same graphs: int8 weights per
        # output channel, activations quantized per tensor as each MatMul runs.
        from onnxruntime.quantization import QuantType, quantize_dynamic
        for name, f in list(files.items()):
            q = f"{args.onnx_dir}/{f[:-5]}.int8-dynamic.onnx"
            if not os.path.exists(q):
                quantize_dynamic(f"{args.onnx_dir}/{f}", q, per_channel=True, weight_type=QuantType.QInt8)
            files[name + "q"] = os.path.basename(q)
    orts = {name: Ort(f"{args.onnx_dir}/{f}", args.threads) for name, f in files.items()}
    engine = subprocess.Popen([args.engine_bin, args.model_dir], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert engine.stdout.readline().strip() == "ready", "the Quiver harness did not start"

    conn = None
    if args.served:
        deadline = time.time() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
                conn.request("GET", "/v2/models/minilm/ready")
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("quiver serve did not become ready in 120 s (see /tmp/quiver-vs-ort.log)")
            time.sleep(0.5)

    # Same answers before timing: ORT's embedding against Quiver's served one.
    def served_call(body):
        nonlocal conn
        try:
            conn.request("POST", "/v2/models/minilm/infer", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closes idle keep-alive connections; only the warm-up meets this.
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
            conn.request("POST", "/v2/models/minilm/infer", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
        data = r.read()
        assert r.status == 200, (r.status, data[:200])
        return data

    if conn is not None:
        f = feeds_for(tok, 4, 16)
        body = json.dumps({"inputs": [{"name": "text", "shape": [4], "datatype": "BYTES", "data": texts(4, 16)}]})
        out = json.loads(served_call(body))["outputs"][0]
        q = np.array(out["data"], np.float32).reshape(out["shape"])
        diff = float(np.abs(q - orts["ort16"].embed(f)).max())
        print(f"check: max |Quiver served - ORT| over 4 embeddings = {diff:.2e}", flush=True)
        assert diff < 1e-4, diff

    def run(e, tokens, batch):
        if e in orts:
            f = feeds_for(tok, batch, tokens)
            return timed(lambda: orts[e].embed(f), args.seconds)
        if e == "served":
            body = json.dumps({"inputs": [{"name": "text", "shape": [batch], "datatype": "BYTES",
                                           "data": texts(batch, tokens)}]})
            return timed(lambda: served_call(body), args.seconds)
        engine.stdin.write(f"{e} {tokens} {batch} {args.seconds}\n")
        engine.stdin.flush()
        reply = engine.stdout.readline().split()
        assert reply and reply[0] == "ok", f"Quiver {e}: {' '.join(reply)}"
        return float(reply[2])

    engines = ["kernels", "ort16", "ort18"] + (["served"] if conn is not None else [])
    if args.int8:
        engines += ["int8", "ort16q", "ort18q"]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "scalar"
    print(f"CPU: {cpu} ({isa}); threads: {args.threads}; onnxruntime {ort.__version__}; "
          f"rounds: {args.rounds} x {args.seconds:g} s per engine and cell", flush=True)
    head = "| tokens | batch | ORT s/s | Quiver in-process s/s | in-process / ORT |"
    rule = "| ---: | ---: | ---: | ---: | ---: |"
    if conn is not None:
        head += " Quiver served (REST) s/s | served / ORT |"
        rule += " ---: | ---: |"
    print(head + " ORT file |")
    print(rule + " --- |", flush=True)
    results, int8_rows = [], []
    for tokens, batch in cells:
        per = {e: [] for e in engines}
        for r in range(args.rounds):
            k = r % len(engines)
            for e in engines[k:] + engines[:k]:
                per[e].append(run(e, tokens, batch))
        sps = {e: batch / median(ts) for e, ts in per.items()}
        best = max(("ort16", "ort18"), key=lambda e: sps[e])
        o = sps[best]
        # Paired: each round's Quiver time against the same round's faster ORT file.
        ort_round = [min(a, b) for a, b in zip(per["ort16"], per["ort18"])]
        ratio = {e: median([o_t / q_t for o_t, q_t in zip(ort_round, per[e])])
                 for e in engines if e not in orts}
        if args.int8:
            ortq_round = [min(a, b) for a, b in zip(per["ort16q"], per["ort18q"])]
            int8_rows.append((tokens, batch, sps["kernels"], batch / median(per["int8"]),
                              median([k / i for k, i in zip(per["kernels"], per["int8"])]),
                              batch / median(ortq_round),
                              median([o / i for o, i in zip(ortq_round, per["int8"])]),
                              median([o / q for o, q in zip(ort_round, ortq_round)])))
        line = f"| {tokens} | {batch} | {o:.1f} | {sps['kernels']:.1f} | {ratio['kernels']:.2f} |"
        if conn is not None:
            line += f" {sps['served']:.1f} | {ratio['served']:.2f} |"
        print(line + f" opset {best[3:]} |", flush=True)
        results.append({"tokens": tokens, "batch": batch, "seconds": per, "sentences_per_s": sps,
                        "paired_ratio": ratio})
    if args.int8:
        print()
        print("| tokens | batch | Quiver fp32 s/s | Quiver int8 s/s | Quiver int8 / fp32 | "
              "ORT int8 s/s | Quiver int8 / ORT int8 | ORT int8 / ORT fp32 |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for t, b, f32, i8, up, oq, vs, oup in int8_rows:
            print(f"| {t} | {b} | {f32:.1f} | {i8:.1f} | {up:.2f} | {oq:.1f} | {vs:.2f} | {oup:.2f} |")
    engine.stdin.close()
    engine.wait()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(f"{args.out}/results.json", "w") as fh:
            json.dump({"cpu": cpu, "isa": isa, "threads": args.threads, "onnxruntime": ort.__version__,
                       "cells": results}, fh, indent=1)


if __name__ == "__main__":
    main()
