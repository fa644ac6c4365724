# shellcheck shell=bash
# Sourced by .ci/run: points every build at a cache that survives clean clones on the same
# machine, so CI compiles only what changed since the last run there.
#
#   $QUIVER_CACHE                     ${XDG_CACHE_HOME:-$HOME/.cache}/quiver by default
#   $QUIVER_CACHE/build/<key>/target  CARGO_TARGET_DIR: fmt, clippy, the tests (one build)
#   $QUIVER_CACHE/build/<key>/loom    the loom models (they need RUSTFLAGS="--cfg loom")
#   $QUIVER_CACHE/build/<key>/cuda    the `cuda` feature's compile-and-link check
#   $QUIVER_CACHE/build/<key>/fuzz    the fuzz targets (nightly, sanitizers: scripts/fuzz)
#   $QUIVER_CACHE/cuda                the CUDA wheels (a fixed path: candle-kernels rebuilds
#                                     from scratch, 15 minutes, whenever CUDA_HOME moves)
#   $QUIVER_CACHE/models              the test models (scripts/fetch-models)
#
# <key> is the toolchain (`rustc -vV`) and Cargo.lock, hashed. A new key (a dependency
# changed) starts from the newest build directory of the same toolchain, moved into place,
# so only what changed is rebuilt; Cargo's fingerprints make that exact. Older build
# directories are removed: the cache holds one key per toolchain.

QUIVER_CACHE=${QUIVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quiver}
_toolchain=$(rustc -vV | sha256sum | cut -c1-12)
_lock=$(sha256sum Cargo.lock | cut -c1-12)
_key="$_toolchain-$_lock"
_builds="$QUIVER_CACHE/build"
mkdir -p "$_builds"

if [[ ! -d "$_builds/$_key" ]]; then
  # The newest build directory of this toolchain, if any, becomes this key's.
  _seed=$(find "$_builds" -mindepth 1 -maxdepth 1 -type d -name "$_toolchain-*" -printf '%T@ %p\n' \
    | sort -rn | head -n1 | cut -d' ' -f2-)
  if [[ -n "$_seed" ]]; then
    echo "ci-cache: Cargo.lock changed; reusing $(basename "$_seed") as $_key (Cargo rebuilds what changed)"
    mv "$_seed" "$_builds/$_key"
  else
    echo "ci-cache: no build of this toolchain cached; cold build into $_builds/$_key"
    mkdir -p "$_builds/$_key"
  fi
else
  echo "ci-cache: warm build directory $_builds/$_key"
fi
touch "$_builds/$_key"
# One key per toolchain is kept; builds of other toolchains are removed too (stale).
find "$_builds" -mindepth 1 -maxdepth 1 -type d ! -name "$_key" -exec rm -rf {} +

export QUIVER_CACHE
export CARGO_TARGET_DIR="$_builds/$_key/target"
export QUIVER_LOOM_TARGET_DIR="$_builds/$_key/loom"
export QUIVER_CUDA_TARGET_DIR="$_builds/$_key/cuda"
export QUIVER_FUZZ_TARGET_DIR="$_builds/$_key/fuzz"
export QUIVER_CUDA_DIR="$QUIVER_CACHE/cuda"
export QUIVER_MODELS_DIR="$QUIVER_CACHE/models"
# Incremental compilation helps an edited tree, not a fresh clone (every workspace file is
# new): off, it saves the disk and time of writing its caches.
export CARGO_INCREMENTAL=0
unset _toolchain _lock _key _builds _seed
