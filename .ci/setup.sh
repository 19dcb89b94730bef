#!/usr/bin/env bash
# Installs and starts what the test suite needs, on Debian as root; idempotent (safe to run
# again). The README's test command runs it before `cargo test --release`; .ci/run does too.
#   - PostgreSQL for the buffer tests (.ci/postgres.sh),
#   - Chromium, and tensorboard + mlflow in .ci/venv, for tests/cli/observability.rs,
#   - the `gguf` Python package in .ci/venv for tests/model/gguf_quantized.rs,
#   - vLLM's CPU build (+ transformers) in .ci/vllm-venv for tests/train/vllm_sync.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/postgres.sh
bash .ci/install-observe.sh
bash .ci/install-gguf.sh
bash .ci/install-vllm.sh
