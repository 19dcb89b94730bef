#!/usr/bin/env bash
# Observability tests (tests/cli/observability.rs): the `tensorboard` event reader and an `mlflow`
# tracking server in the shared venv, and headless Chromium for `grove view`. Idempotent.
# Measured on a 2-core machine with empty caches: pip ~60 s (mlflow is large), apt ~40 s.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
[ -x .ci/venv/bin/python ] || python3 -m venv .ci/venv
if ! .ci/venv/bin/python -c 'import importlib.metadata as m, sys; sys.exit(not (m.version("tensorboard") == "2.21.0" and m.version("mlflow") == "3.17.2"))' 2>/dev/null; then
  .ci/venv/bin/pip install -q tensorboard==2.21.0 mlflow==3.17.2
fi
