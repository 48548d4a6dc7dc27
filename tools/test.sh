#!/usr/bin/env bash
# Runs the test suite (slow end-to-end tests included) in .venv/, creating it if needed.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow" -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/venv.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2
# With no paths given, pytest collects pyproject's testpaths (tests/).
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
