#!/usr/bin/env bash
# `grove serve` throughput against HF `generate` batched, measured in one run on this machine:
# 64 completion requests (an 8-token prompt, 32 sampled tokens each) on random weights of the
# anchor shape (hidden 256, 4 layers, vocabulary 50257), with 1, 8 and 64 concurrent clients
# through grove's server (continuous batching, and its single-request path `--max-batch 1`),
# and HF `generate` on the same shape with a batch of 1, 8 and 64 sequences (torch, 2 threads).
# Prints the markdown table of docs/performance.md, section "grove serve". Not part of CI;
# about 5 minutes on a 2-core machine.
#
#   HF_PYTHON=/path/to/venv/bin/python bash bench/serve.sh
#
# HF_PYTHON is a Python with torch and transformers (e.g. .ci/vllm-venv/bin/python after
# .ci/install-vllm.sh). Raw JSON lines go to $OUT (default target/bench-out/serve).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${BENCH_OUT:-$root/target/bench-out/serve}
PY=${HF_PYTHON:?set HF_PYTHON to a Python with torch and transformers}
mkdir -p "$OUT"
cd "$root"
cargo build --release --quiet
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
echo "cpu: $cpu, $(nproc) threads; load before: $(cut -d' ' -f1-3 /proc/loadavg)" > "$OUT/machine.txt"
target/release/grove bench --serve --model anchor \
  --tokenizer ../shared/data/tokenizers/gpt2/tokenizer.json | grep '^{' > "$OUT/grove_serve.jsonl"
for b in 1 8 64; do
  OMP_NUM_THREADS=2 "$PY" bench/torch_anchors.py generate --shape anchor --batch "$b" \
    --prompt 8 --new 32 --reps 2 > "$OUT/hf_generate_$b.json"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
grove = [json.loads(l) for l in open(f"{out}/grove_serve.jsonl")]
print(open(f"{out}/machine.txt").read().strip().replace("\n", "; "))
print()
print("| clients (HF batch) | grove serve, batched (tokens/s) | single-request path (tokens/s) "
      "| HF `generate` batched (tokens/s) | grove / HF | forward passes, batched / single |")
print("|---|---|---|---|---|---|")
for r in grove:
    hf = json.load(open(f"{out}/hf_generate_{r['clients']}.json"))
    print(f"| {r['clients']} | {r['batched_tokens_per_s']:.0f} | {r['single_tokens_per_s']:.0f} "
          f"| {hf['sample_tokens_per_s']:.0f} | {r['batched_tokens_per_s'] / hf['sample_tokens_per_s']:.2f}× "
          f"| {r['batched_forward_passes']} / {r['single_forward_passes']} |")
print()
print(f"HF: torch {hf['torch']}, best of 2 timed generate calls after a warm-up call.")
PY
