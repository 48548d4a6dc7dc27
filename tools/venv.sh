#!/usr/bin/env bash
# Creates or reuses .venv/ at the repo root and installs the package into it (editable).
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# MMR_VENV: another venv folder (tools/test.sh keeps the beam extra in .venv-beam/, see there).
VENV="${MMR_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "[venv] creating $VENV with $($PY --version)" >&2
  "$PY" -m venv "$VENV"
fi
# MMR_VENV_EXTRAS: optional extras of pyproject.toml, e.g. "cuda" on NVIDIA GPU machines, "bench,beam".
EXTRAS="${MMR_VENV_EXTRAS:-}"
TARGET="$ROOT${EXTRAS:+[$EXTRAS]}"
STAMP="$VENV/.mmr_jax_installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $EXTRAS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[venv] installing mmr_jax${EXTRAS:+[$EXTRAS]} and its dependencies (a few minutes on a fresh machine)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e "$TARGET" >&2
  echo "$WANT" > "$STAMP"
fi
