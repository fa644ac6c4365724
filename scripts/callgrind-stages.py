#!/usr/bin/env python3
"""Instructions per request from scripts/bench-quic-cost's callgrind dumps, split by stage.

Usage: callgrind-stages.py OUT NAME...   (reads OUT/callgrind.NAME.load and OUT/cg-NAME/report.json)

Each stage is the inclusive cost of the functions whose names match its patterns (for each
pattern the largest matching symbol, its outermost instance), divided by the requests the load
answered. The total is exact; the stages are approximate, since the bodies of async functions
inline into their callers and a stage's functions may nest in another's.
"""
import json
import re
import subprocess
import sys

out, names = sys.argv[1], sys.argv[2:]

# Stage -> regular expressions of function names, outermost first.
STAGES = [
    ("QUIC receive (quinn-proto: decrypt, frames, ACKs)", [r"quinn_proto::endpoint::Endpoint::handle\b", r"quinn_proto::connection::Connection::handle_event\b"]),
    ("QUIC send (quinn-proto: packets, encrypt)", [r"quinn_proto::connection::Connection::poll_transmit\b"]),
    ("UDP system calls (user side)", [r"quinn_udp::imp::send\b", r"quinn_udp::imp::recv\b"]),
    ("stream task spawn", [r"tokio::task::spawn::spawn\b"]),
    ("frame read and decode", [r"quiver_gateway::framing::read_header", r"quiver_gateway::framing::read_body", r"quiver_gateway::framing::read_bytes"]),
    ("request checks (auth, limits) and tensors", [r"quiver_gateway::frontend::auth::Auth::check_parameters", r"quiver_gateway::tensor::request_from_proto"]),
    ("routing and admission (inline compute included)", [r"quiver_gateway::router::Router::route::\{\{closure\}\}"]),
    ("  of which compute (Model::forward)", [r"<quiver_kernels::identity::Identity as quiver_kernels::model::Model>::forward", r"<quiver_kernels::mlp::[A-Za-z]+ as quiver_kernels::model::Model>::forward"]),
    ("device thread (scheduler loop, hand-off, compute)", [r"quiver_gateway::device::DeviceLoop::run\b"]),
    ("encode and write the reply", [r"quiver_gateway::frontend::quic::answer_local", r"quiver_gateway::tensor::split_local_response", r"quiver_gateway::frontend::quic::answer::", r"quiver_gateway::tensor::response_to_proto", r"quiver_protocol::frame::encode_response"]),
    ("metrics", [r"quiver_gateway::metrics::Metrics::record_request"]),
    ("malloc and free (self; glibc or mimalloc)", []),
]
# glibc's malloc, and mimalloc's (the quiver binary's allocator since the per-request work).
MALLOC = re.compile(r"^(malloc|free|realloc|calloc|_int_malloc|_int_free|malloc_consolidate|_int_realloc|cfree|__libc_malloc|__libc_free|tcache_\w+|unlink_chunk\S*|_?mi_\w+|mi_\w+)\b")

def annotate(path, inclusive):
    args = ["callgrind_annotate", "--threshold=100"]
    if inclusive:
        args.append("--inclusive=yes")
    text = subprocess.run(args + [path], capture_output=True, text=True, check=True).stdout
    total, funcs = 0, []
    for line in text.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+(\(\s*[\d.]+%\)\s+)?(PROGRAM TOTALS|.+)$", line)
        if not m:
            continue
        ir = int(m.group(1).replace(",", ""))
        rest = m.group(3).strip()
        if rest == "PROGRAM TOTALS":
            total = ir
            continue
        # "file:function [object]" or "???:function [object]"
        fn = rest.split(":", 1)[1] if ":" in rest else rest
        fn = re.sub(r"\s+\[[^\]]*\]$", "", fn)
        funcs.append((ir, fn))
    return total, funcs

rows = {}
for name in names:
    report = json.load(open(f"{out}/cg-{name}/report.json"))
    requests = sum(s["ok"] for s in report["steps"])
    path = f"{out}/callgrind.{name}.load"
    total, inclusive = annotate(path, True)
    _, exclusive = annotate(path, False)
    per = {"total": total / requests, "requests": requests}
    for stage, patterns in STAGES:
        if not patterns:
            per[stage] = sum(ir for ir, fn in exclusive if MALLOC.match(fn)) / requests
            continue
        cost = 0
        for pattern in patterns:
            # The largest inclusive cost among the matching symbols: the outermost instance.
            hits = [ir for ir, fn in inclusive if re.search(pattern, fn)]
            cost += max(hits, default=0)
        per[stage] = cost / requests
    rows[name] = per

print("| instructions per request | " + " | ".join(names) + " |")
print("| --- |" + " --- |" * len(names))
print("| requests in the window | " + " | ".join(str(rows[n]["requests"]) for n in names) + " |")
print("| **total** | " + " | ".join(f"**{rows[n]['total']:,.0f}**" for n in names) + " |")
for stage, _ in STAGES:
    print(f"| {stage} | " + " | ".join(f"{rows[n][stage]:,.0f}" for n in names) + " |")
for n in names:
    rows[n]["rest"] = rows[n]["total"] - sum(
        rows[n][stage] for stage, _ in STAGES if not stage.startswith("  "))
print("| rest (tokio scheduling, quinn's stream API, timers; stages overlap where async bodies inline) | "
      + " | ".join(f"{rows[n]['rest']:,.0f}" for n in names) + " |")
json.dump(rows, open(f"{out}/instructions.json", "w"), indent=1)
