#!/usr/bin/env bash
# Math-Verify (the Python reference verifier) for bench/verifier.sh, which compares grove's
# verifier with it. Idempotent; installs into the shared gitignored venv .ci/venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .ci/venv/bin/python ]; then
  python3 -m venv .ci/venv
fi
if ! .ci/venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('math-verify') != '0.9.0')" 2>/dev/null; then
  # The issue names the extra `[antlr4_13_2]`; 0.9.0 has none (its antlr4 4.13.2 runtime is a
  # plain dependency), so the pin below installs the same packages without a warning.
  .ci/venv/bin/pip install -q 'math-verify==0.9.0'
fi
