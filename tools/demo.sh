#!/usr/bin/env bash
# The main job on the embedded default: generate the synthetic catalogue, run the ablation
# (stage 1 + every stage-2 row), evaluate with ScaNN and print the table. Creates .venv/ if needed.
# Usage: bash tools/demo.sh [WORKDIR] [extra mmr_jax.ablation flags]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/venv.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
WORKDIR="${1:-workdirs/demo}"
shift || true
DATA="data/synthetic"
if [ ! -f "$DATA/catalog_info.json" ]; then
  .venv/bin/python -m mmr_jax.data.make_synthetic --out "$DATA" --preset demo
fi
exec .venv/bin/python -m mmr_jax.ablation --workdir "$WORKDIR" --data "$DATA" "$@"
