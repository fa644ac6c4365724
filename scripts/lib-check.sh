# Shared by the stock-client checks (scripts/check-embedding-clients, scripts/check-openapi,
# scripts/check-docs-page): a cached Python virtual environment, the quiver binary, and a gateway
# serving all-MiniLM-L6-v2 on loopback ports chosen by the OS. Source it; it defines functions
# only.
#
#   check_venv NAME PIN...   a venv under $QUIVER_CACHE/NAME (default ~/.cache/quiver), keyed by
#                            the Python version and the pins, installed once; sets $venv
#   check_quiver             $QUIVER_BIN, else the newest quiver under $CARGO_TARGET_DIR (built
#                            here if there is none); sets $quiver
#   check_serve_minilm       fetches the model (scripts/fetch-models), writes a config with a
#                            bearer token ($CHECK_TOKEN), starts quiver, waits (bounded) for
#                            "quiver: ready"; sets $work, $pid, $http (HOST:PORT), $h3 (UDP
#                            HOST:PORT); killed and cleaned up on exit
#   check_alive              fails unless the gateway still runs and answers /v2/health/ready

CHECK_TOKEN=${CHECK_TOKEN:-check-s3cret}
CHECK_MODEL=all-MiniLM-L6-v2

check_venv() {
  local name=$1
  shift
  local cache=${QUIVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quiver}/$name
  local pyver
  pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  venv="$cache/venv-py$pyver-$(echo "$*" | sha256sum | cut -c1-12)"
  if [[ ! -f "$venv/.complete" ]]; then
    echo "$name: installing $* into $venv"
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "$@"
    touch "$venv/.complete"
  fi
}

check_quiver() {
  quiver=${QUIVER_BIN:-}
  if [[ -z "$quiver" ]]; then
    quiver=$(ls -t "${CARGO_TARGET_DIR:-target}"/{debug,release}/quiver 2>/dev/null | head -n1 || true)
  fi
  if [[ -z "$quiver" || ! -x "$quiver" ]]; then
    cargo build --quiet --bin quiver
    quiver="${CARGO_TARGET_DIR:-target}/debug/quiver"
  fi
}

check_cleanup() {
  if [[ -n "${pid:-}" ]]; then
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  fi
  [[ -n "${work:-}" ]] && rm -rf "$work"
  return 0
}

check_serve_minilm() {
  scripts/fetch-models >/dev/null
  local models=${QUIVER_MODELS_DIR:-${QUIVER_MODELS_ROOT:-models}}
  local dir
  dir=$(cd "$models/$CHECK_MODEL" && pwd)
  check_quiver
  work=$(mktemp -d)
  pid=
  trap check_cleanup EXIT
  cat >"$work/quiver.toml" <<TOML
[server]
quic_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
grpc_listen = "127.0.0.1:0"
metrics_listen = "off"
auth_tokens = ["$CHECK_TOKEN"]
auth_exempt_health = true

[[models]]
name = "$CHECK_MODEL"
kind = "embedding"
path = "$dir"
# Results, not latency: a CI machine may be busy.
default_timeout_ms = 30000
TOML
  "$quiver" config check "$work/quiver.toml" >/dev/null
  RUST_LOG=warn "$quiver" serve --config "$work/quiver.toml" >"$work/out" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    grep -q "quiver: ready" "$work/out" && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/out"; return 1; }
    sleep 0.1
  done
  grep -q "quiver: ready" "$work/out" || { cat "$work/out"; echo "quiver never ready" >&2; return 1; }
  http=$(sed -n 's|^quiver: REST (HTTP/1.1, h2c) listening on http://||p' "$work/out")
  h3=$(sed -n 's|^quiver: HTTP/3 (h3) listening on udp ||p' "$work/out")
}

check_alive() {
  kill -0 "$pid" 2>/dev/null || { echo "the gateway exited:" >&2; cat "$work/out" >&2; return 1; }
  python3 - "$http" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(f"http://{sys.argv[1]}/v2/health/ready", timeout=10) as r:
    assert r.status == 200, r.status
PY
}
