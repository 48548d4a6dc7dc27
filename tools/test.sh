#!/usr/bin/env bash
# Runs the test suite (slow end-to-end tests included) in .venv/, creating it if needed.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow" -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/venv.sh"
# Apache Beam's import path is tested in a venv of its own: the beam extra needs Pillow < 13, and the main
# venv's Pillow 13 is what the export parity tests pin EXIF decoding to. MMR_TEST_BEAM=0 skips it.
if [ "${MMR_TEST_BEAM:-1}" = "1" ]; then
  MMR_VENV="$ROOT/.venv-beam" MMR_VENV_EXTRAS=beam bash "$ROOT/tools/venv.sh"
  export MMR_BEAM_PYTHON="$ROOT/.venv-beam/bin/python"
fi
cd "$ROOT"
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2
# With no paths given, pytest collects pyproject's testpaths (tests/). Two pytest-xdist workers (most tests keep
# about one core busy); tests that share a module-scoped fixture stay on one worker (tests/conftest.py).
# MMR_TEST_WORKERS=0 runs in one process, as does `-n 0` among the arguments.
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider -n "${MMR_TEST_WORKERS:-2}" --dist loadgroup "$@"
