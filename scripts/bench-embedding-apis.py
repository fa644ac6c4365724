"""Closed-loop clients against one embedding route at a time; see scripts/bench-embedding-apis.

Usage: bench-embedding-apis.py HTTP_ADDR TOKEN MODEL CONCURRENCY SECONDS
"""

import http.client
import json
import sys
import threading
import time

addr, token, model, concurrency, seconds = sys.argv[1:6]
concurrency, seconds = int(concurrency), float(seconds)
host, port = addr.rsplit(":", 1)
WORDS = "edge gateways batch requests for the accelerator while deadlines hold".split()


def text(i):
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8)) + f" {i}"


ROUTES = {
    "KServe /v2/models/M/infer (JSON)": (
        f"/v2/models/{model}/infer",
        lambda t: {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [t]}]}),
    "OpenAI /v1/embeddings (float)": (
        "/v1/embeddings", lambda t: {"model": model, "input": t, "encoding_format": "float"}),
    "OpenAI /v1/embeddings (base64)": (
        "/v1/embeddings", lambda t: {"model": model, "input": t, "encoding_format": "base64"}),
    "TEI /embed": ("/embed", lambda t: {"inputs": t}),
}


def worker(path, make, stop, out, seed):
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    i = seed
    while time.monotonic() < stop:
        body = json.dumps(make(text(i))).encode()
        start = time.monotonic()
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        data = resp.read()
        took = time.monotonic() - start
        if resp.status != 200:
            out.append((None, resp.status, data[:200]))
        else:
            out.append((took, len(data), None))
        i += concurrency


print(f"{concurrency} concurrent clients, {seconds:.0f} s per route, one text per request")
for name, (path, make) in ROUTES.items():
    # A short warm-up, not counted.
    warm = []
    worker(path, make, time.monotonic() + 1.0, warm, 0)
    outs = [[] for _ in range(concurrency)]
    stop = time.monotonic() + seconds
    threads = [threading.Thread(target=worker, args=(path, make, stop, outs[k], k))
               for k in range(concurrency)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    done = [o for out in outs for o in out]
    ok = sorted(o[0] for o in done if o[0] is not None)
    failed = [o for o in done if o[0] is None]
    size = sum(o[1] for o in done if o[0] is not None) / max(len(ok), 1)
    p = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] * 1000 if ok else float("nan")
    print(f"{name:36s} {len(ok) / elapsed:8.1f} req/s   p50 {p(0.5):7.1f} ms   p99 {p(0.99):7.1f} ms"
          f"   {size:7.0f} B/response   failed {len(failed)}"
          + (f" (first: {failed[0][1]} {failed[0][2]!r})" if failed else ""))
