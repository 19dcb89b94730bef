#!/usr/bin/env bash
# grove against the Python anchors (PyTorch, HF generate, TRL), measured in one run on this
# machine; writes docs/performance.md. Not part of CI.
#
#   bash bench/compare.sh                  about 20 minutes on 2 cores; the first run also
#                                          builds the anchors' venv (~3 GB, outside the repo)
#   SKIP_ANCHORS=1 bash bench/compare.sh   re-measure grove only, reuse the anchors in $OUT
#
# Results: $OUT (default target/bench-out) holds every raw JSON line and log.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=$(cd "$root/../shared" && pwd)
OUT=${BENCH_OUT:-$root/target/bench-out}
VENV=${BENCH_VENV:-$HOME/.cache/grove-bench-venv}
export OMP_NUM_THREADS=2 RAYON_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
mkdir -p "$OUT"
cd "$root"
cargo build --release --quiet
G="$root/target/release/grove"
TOK="$shared/data/tokenizers/gpt2/tokenizer.json"

if [ -z "${SKIP_ANCHORS:-}" ]; then
  BENCH_OUT="$OUT/anchors" BENCH_VENV="$VENV" bash "$shared/bench/run_all.sh"
  PY="$VENV/bin/python"
  "$PY" bench/torch_anchors.py train --shape spike --batch 8 --seq 256 > "$OUT/torch_train_spike.json"
  "$PY" bench/torch_anchors.py train --shape qwen2.5-0.5b --batch 2 --seq 128 --reps 2 > "$OUT/torch_train_qwen.json"
  "$PY" bench/torch_anchors.py generate --shape qwen2.5-0.5b --batch 8 --new 32 --reps 2 > "$OUT/torch_generate_qwen.json"
fi

echo "grove: RL steps on the TRL anchor work"
"$G" bench --model anchor --rl-step --tokenizer "$TOK" --steps 10 --reward exact > "$OUT/grove_rl_exact.json"
"$G" bench --model anchor --rl-step --tokenizer "$TOK" --steps 10 --reward partial > "$OUT/grove_rl_partial.json"
echo "grove: sampling 64 x 32 on the anchor model"
"$G" bench --model anchor --sample-batch 64 --new-tokens 32 --train-batch 1 --train-seq 2 --reps 5 > "$OUT/grove_sample_anchor.json"
echo "grove: training step on the spike config"
"$G" bench --model spike --train-batch 8 --train-seq 256 --sample-batch 1 --new-tokens 1 --reps 5 > "$OUT/grove_train_spike.json"
"$G" bench --model spike --ops --train-batch 8 --train-seq 256 --reps 5 > "$OUT/grove_ops_spike.jsonl"
echo "grove: Qwen2.5-0.5B shapes"
"$G" bench --model qwen2.5-0.5b --train-batch 2 --train-seq 128 --sample-batch 1 --new-tokens 1 --reps 2 > "$OUT/grove_train_qwen.json"
"$G" bench --model qwen2.5-0.5b --train-batch 1 --train-seq 2 --sample-batch 8 --new-tokens 32 --reps 2 > "$OUT/grove_sample_qwen.json"

python3 bench/report.py "$OUT" > docs/performance.md
echo "wrote docs/performance.md"
