#!/usr/bin/env bash
# bf16 against f32 on this CPU, every pair measured in the same run: the linear layers' products
# at Qwen2.5-0.5B shapes (GFLOP/s), a Qwen2.5-0.5B-shaped training step and sampling in full f32,
# full bf16 and LoRA bf16 (seconds, peak memory of each process), and the quickstart's held-out
# accuracy with model.dtype = f32 and bf16. Prints the tables of docs/performance.md (section
# "bf16"). Not part of CI; about 15 minutes on an idle 2-core machine, and it needs ~12 GB free.
#
#   bash bench/bf16.sh
#   SKIP_QUICKSTART=1 bash bench/bf16.sh   the speed tables only
#
# Raw JSON lines and logs go to $OUT (default target/bench-out/bf16).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${BENCH_OUT:-$root/target/bench-out/bf16}
mkdir -p "$OUT"
cd "$root"
cargo build --release --quiet
G="$root/target/release/grove"
QWEN=(--model qwen2.5-0.5b --train-batch 2 --train-seq 128 --sample-batch 8 --new-tokens 32 --reps 2)

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx512f|avx512_bf16|amx_bf16)$' | xargs || true)
echo "cpu: $cpu, $(nproc) threads; bf16 features: ${flags:-none}" > "$OUT/machine.txt"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"

"$G" bench "${QWEN[@]}" --gemm-bf16 > "$OUT/gemm.jsonl"
for variant in "f32" "bf16" "bf16 --lora-rank 16"; do
  name=$(echo "$variant" | tr -d ' -')
  # shellcheck disable=SC2086
  "$G" bench "${QWEN[@]}" --dtype $variant > "$OUT/step_$name.json"
done
if [ -z "${SKIP_QUICKSTART:-}" ]; then
  for dtype in f32 bf16; do
    rm -rf "$OUT/qs-$dtype"
    "$G" train --set "model.dtype=$dtype" --set "output_dir=\"$OUT/qs-$dtype\"" \
      > "$OUT/quickstart_$dtype.log" 2>&1
  done
fi
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"

python3 - "$OUT" <<'PY'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
print(open(out / "machine.txt").read().strip().replace("\n", "; "))
print()
print("| product | m × k × n | f32 GFLOP/s | bf16 GFLOP/s | bf16 speed-up |")
print("|---|---|---|---|---|")
for line in open(out / "gemm.jsonl"):
    g = json.loads(line)
    print(f"| {g['what']} | {g['m']} × {g['k']} × {g['n']} | {g['f32_gflops']:.0f} | "
          f"{g['bf16_gflops']:.0f} | {g['speedup']:.2f}× ({g['kernel']}) |")
print()
print("| Qwen2.5-0.5B shapes | training step 2 × 128 (s) | forward (s) | backward (s) | "
      "sampling 8 × 32 (tokens/s) | peak memory (GB) |")
print("|---|---|---|---|---|---|")
base = None
for name, label in [("f32", "full f32"), ("bf16", "full bf16"), ("bf16lorarank16", "LoRA r=16, bf16 base")]:
    r = json.loads(open(out / f"step_{name}.json").read())
    base = base or r
    print(f"| {label} | {r['train_step_s']:.2f} ({base['train_step_s'] / r['train_step_s']:.2f}× f32) | "
          f"{r['train_forward_s']:.2f} | {r['train_backward_s']:.2f} | "
          f"{r['sample_tokens_per_s']:.1f} ({r['sample_tokens_per_s'] / base['sample_tokens_per_s']:.2f}× f32) | "
          f"{r['peak_rss_gb']:.2f} |")
qs = [(d, out / f"quickstart_{d}.log") for d in ("f32", "bf16")]
if all(p.exists() for _, p in qs):
    print()
    print("| quickstart | held-out accuracy |")
    print("|---|---|")
    for d, p in qs:
        text = p.read_text()
        acc = re.search(r"held-out accuracy: (.*)", text)
        print(f"| model.dtype = {d} | {acc.group(1) if acc else 'n/a'} |")
PY
