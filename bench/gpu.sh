#!/usr/bin/env bash
# grove built with --features cuda against PyTorch on the same GPU. Not part of CI; run on a
# machine with an NVIDIA GPU, the CUDA 13 libraries (cuBLAS, cuRAND, NVRTC, cudart; PyTorch's
# pip wheels carry them) and PyTorch with transformers for the anchors.
#
#   bash bench/gpu.sh GROVE_CUDA_BINARY GPT2_TOKENIZER_JSON OUT_DIR
#
# Appends one line per measurement to OUT_DIR/results.tsv (name, exit status, the JSON line the
# command printed; the same commands as bench/compare.sh, with `--device cuda` for the Python
# side), their stderr to OUT_DIR/stderr.log and the quickstart's output to OUT_DIR/quickstart.log.
# Results are written as they come, so a run cut short keeps what it measured.
set -uo pipefail
G=$1 TOK=$2 OUT=$3
mkdir -p "$OUT"
run() { # name, timeout (s), command...
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$OUT/stderr.log"
  local json rc
  json=$(timeout "$limit" "$@" 2>> "$OUT/stderr.log" | tail -n 1)
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$json" | tee -a "$OUT/results.tsv"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run grove_train_spike 60 "$G" bench --model spike --train-batch 8 --train-seq 256 --sample-batch 1 --new-tokens 1 --reps 5
run grove_sample_anchor 60 "$G" bench --model anchor --sample-batch 64 --new-tokens 32 --train-batch 1 --train-seq 2 --reps 5
run grove_rl_exact 90 "$G" bench --model anchor --rl-step --tokenizer "$TOK" --steps 10 --reward exact
run grove_train_qwen 90 "$G" bench --model qwen2.5-0.5b --train-batch 2 --train-seq 128 --sample-batch 1 --new-tokens 1 --reps 2
run grove_sample_qwen 90 "$G" bench --model qwen2.5-0.5b --train-batch 1 --train-seq 2 --sample-batch 8 --new-tokens 32 --reps 2
PY=${PYTHON:-python3}
run torch_train_spike 90 "$PY" bench/torch_anchors.py train --device cuda --shape spike --batch 8 --seq 256
run torch_generate_anchor 90 "$PY" bench/torch_anchors.py generate --device cuda --shape anchor --batch 64 --new 32 --prompt 8
run torch_train_qwen 90 "$PY" bench/torch_anchors.py train --device cuda --shape qwen2.5-0.5b --batch 2 --seq 128 --reps 2
run torch_generate_qwen 90 "$PY" bench/torch_anchors.py generate --device cuda --shape qwen2.5-0.5b --batch 8 --new 32 --reps 2
echo "== quickstart on the GPU"
timeout 150 "$G" train --set output_dir=\""${TMPDIR:-/tmp}/grove-gpu-runs"\" > "$OUT/quickstart.log" 2>&1
echo "rc=$? $(tail -n 3 "$OUT/quickstart.log")"
