#!/usr/bin/env bash
# Python for the GGUF tests: the `gguf` package (llama.cpp's reader/writer and its numpy
# dequantizers, the independent reference grove's loader is checked against) into .ci/venv.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .ci/venv/bin/python ] || python3 -m venv .ci/venv
.ci/venv/bin/pip install -q gguf==0.19.0 numpy==2.4.6
