#!/usr/bin/env bash
# bf16 against f32 on this CPU, every figure measured in the same run: the linear layers'
# products at Qwen2.5-0.5B shapes on each bf16 kernel (GFLOP/s), GRPO steps of a
# Qwen2.5-0.5B-shaped model in full f32, full bf16, LoRA on a bf16 base and LoRA on a Q4_0 base
# (seconds per step, peak memory), the same work in PEFT + TRL, and the quickstart's held-out
# accuracy and wall time with model.dtype = f32 and bf16. Writes bench/bf16-results/bf16.md,
# which bench/report.py copies into docs/performance.md (section "bf16"). Not part of CI; about
# 40 minutes on a 2-core machine, and it needs ~10 GB free.
#
#   bash bench/bf16.sh
#   PARTS="gemm grove" bash bench/bf16.sh   some parts only (default: gemm anchor grove trl quickstart
#                                           large15 trl15; the last two: LoRA at Qwen2.5-1.5B's shapes)
#   REPORT_ONLY=1 bash bench/bf16.sh        the tables from the results already in $OUT
#
# The PEFT + TRL rows run bench/trl_figures.py with $TRL_PYTHON (a Python with torch,
# transformers, trl, peft and bitsandbytes; default: python3). Raw JSON lines and logs go to
# $OUT (default target/bench-out/bf16); a notes.txt there, written by hand, is printed under
# the RL-step table (what could not be measured, and why).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${BENCH_OUT:-$root/target/bench-out/bf16}
mkdir -p "$OUT"
cd "$root"
G="$root/target/release/grove"
# Qwen2's tokenizer (stored compressed in ../shared/data).
TOK="$OUT/qwen2-tokenizer.json"
QWEN=(--model qwen2.5-0.5b --train-batch 2 --train-seq 128 --sample-batch 8 --reps 2)
# The RL-step work, the same for grove and TRL: 2 prompts × 4 samples, 16 new tokens, steps
# 3.. timed (STEPS=3 times the third alone: TRL's steps take minutes on a loaded 2-core machine).
STEPS=${STEPS:-4}
WORK=(--prompts 2 --group 4 --new-tokens 16 --steps "$STEPS")
PARTS=${PARTS:-gemm anchor grove trl quickstart large15 trl15}
VARIANTS=("f32:--dtype f32" "bf16:--dtype bf16" "lora-bf16:--dtype bf16 --lora-rank 16"
  "lora-q4:--dtype bf16 --lora-rank 16 --q4-base")

has() { [[ " $PARTS " == *" $1 "* ]]; }
if [ -z "${REPORT_ONLY:-}" ]; then
  has gemm || has anchor || has grove || has quickstart || has large15 && cargo build --release --quiet
  gunzip -c ../shared/data/tokenizers/qwen2/tokenizer.json.gz > "$TOK"
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
  flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx512f|avx512_bf16|amx_bf16|amx_tile)$' | xargs || true)
  [ -s "$OUT/machine.txt" ] || echo "cpu: $cpu, $(nproc) threads; bf16 features: ${flags:-none}" > "$OUT/machine.txt"
  echo "load before ($PARTS): $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"

  has gemm && "$G" bench "${QWEN[@]}" --gemm-bf16 > "$OUT/gemm.jsonl"
  if has anchor; then
    # TRL's anchor work (8 prompts × 8 samples × 32 tokens) on its small model, f32 then bf16.
    for d in f32 bf16; do
      "$G" bench --rl-step --model anchor --tokenizer ../shared/data/tokenizers/gpt2/tokenizer.json \
        --steps 4 --dtype "$d" > "$OUT/anchor_rl_$d.json"
    done
  fi
  for v in "${VARIANTS[@]}"; do
    name=${v%%:*}
    if has grove; then
      # shellcheck disable=SC2086
      "$G" bench --rl-step --model qwen2.5-0.5b --tokenizer "$TOK" "${WORK[@]}" ${v#*:} \
        > "$OUT/rl_$name.json" 2> "$OUT/rl_$name.log" || true
    fi
    if has trl; then
      "${TRL_PYTHON:-python3}" bench/trl_figures.py --variant "$name" --tokenizer "$TOK" "${WORK[@]}" \
        > "$OUT/trl_$name.json" 2> "$OUT/trl_$name.log" || true
    fi
  done
  # Qwen2.5-1.5B's shapes: the LoRA rows only. Full-parameter training needs 16 bytes per
  # parameter before activations (f32 weights, gradients, two AdamW moments): 1.54 B × 16 B
  # = 24.7 GB, more than this 24 GB machine has, for grove and TRL alike.
  for name in lora-bf16 lora-q4; do
    v=$(printf '%s\n' "${VARIANTS[@]}" | grep "^$name:")
    if has large15; then
      # shellcheck disable=SC2086
      "$G" bench --rl-step --model qwen2.5-1.5b --tokenizer "$TOK" "${WORK[@]}" ${v#*:} \
        > "$OUT/rl15_$name.json" 2> "$OUT/rl15_$name.log" || true
    fi
    # bitsandbytes' CPU 4-bit kernels are not reachable here (see notes.txt): LoRA on bf16 only.
    if has trl15 && [ "$name" = lora-bf16 ]; then
      "${TRL_PYTHON:-python3}" bench/trl_figures.py --variant "$name" --shape qwen2.5-1.5b --tokenizer "$TOK" \
        "${WORK[@]}" > "$OUT/trl15_$name.json" 2> "$OUT/trl15_$name.log" || true
    fi
  done
  if has quickstart; then
    for dtype in f32 bf16; do
      rm -rf "$OUT/qs-$dtype"
      "$G" train --set "model.dtype=$dtype" --set "output_dir=\"$OUT/qs-$dtype\"" \
        > "$OUT/quickstart_$dtype.log" 2>&1
    done
  fi
  echo "load after ($PARTS): $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
fi

mkdir -p "$root/bench/bf16-results"
STEPS=$STEPS python3 - "$OUT" <<'PY' | tee "$root/bench/bf16-results/bf16.md"
import json, os, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
steps = int(os.environ["STEPS"])
timed = "step 3" if steps == 3 else f"steps 3–{steps}"
print("""Generated by `bash bench/bf16.sh`; every ratio compares two figures measured in the same run on
the same machine. `model.dtype = "bf16"` follows PyTorch's autocast (TRL's `bf16=True`): the
decoder's linear layers and the output layer multiply bf16 values with f32 accumulation
(`src/model/bf16.rs`, `src/model/amx.rs`: AMX tiles (`tdpbf16ps`) where the CPU has them,
AVX-512-BF16 `vdpbf16ps` for few rows and on CPUs without AMX, otherwise both operands widened
to f32 and the f32 GEMM; `GROVE_SIMD=avx512bf16` or `avx512` forces the lower ones); attention's
own products, norms, softmax, log-probs and losses stay f32; the optimizer updates f32 master
weights with f32 AdamW moments, and each weight's bf16 working copy (and its packed panels) is
made again after every update. A LoRA run's frozen base projections are kept in bf16 only.
""")
print("Machine: " + open(out / "machine.txt").read().strip().replace("\n", "; ") + ".")
print()
print("Products at Qwen2.5-0.5B shapes (`grove bench --model qwen2.5-0.5b --gemm-bf16`), GFLOP/s; a "
      "weight's packed panels made before the timing, as full-parameter bf16 training keeps them:")
print()
gemm = [json.loads(l) for l in open(out / "gemm.jsonl")]
kernels = [k["kernel"] for k in gemm[0]["bf16"]]
names = {"Widen": "bf16 widened to f32", "Avx512Bf16": "AVX-512-BF16", "Amx": "AMX"}
print("| product | m × k × n | f32 | " + " | ".join(names.get(k, k) for k in kernels) + " | best bf16 / f32 |")
print("|---|---|---|" + "---|" * len(kernels) + "---|")
for g in gemm:
    cells = []
    for t in g["bf16"]:
        ran = "" if t["kernel"] == kernels[len(cells)] else f" ({names.get(t['kernel'], t['kernel'])})"
        cells.append(f"{t['gflops']:.0f}{ran}")
    best = max(t["speedup"] for t in g["bf16"])
    print(f"| {g['what']} | {g['m']} × {g['k']} × {g['n']} | {g['f32_gflops']:.0f} | " + " | ".join(cells) + f" | {best:.2f}× |")
print()

def load(p):
    text = p.read_text().strip() if p.exists() else ""
    try:
        return json.loads(text.splitlines()[-1]) if text else None
    except json.JSONDecodeError:
        return None

def why(log):
    if not log.exists():
        return "not run"
    lines = [l.strip() for l in log.read_text().splitlines() if l.strip()]
    err = [l for l in lines if "Error" in l or "error" in l]
    return (err or lines or ["no output"])[-1][:160].replace("|", "/")

a32, a16 = load(out / "anchor_rl_f32.json"), load(out / "anchor_rl_bf16.json")
if a32 and a16:
    print("| TRL anchor model (16M parameters), 8 prompts × 8 samples × 32 tokens | s/step | generate (s) | train (s) |")
    print("|---|---|---|---|")
    for d, r in (("f32", a32), ("bf16", a16)):
        print(f"| grove, `--dtype {d}` | {r['step_s']:.2f} ({a32['step_s'] / r['step_s']:.2f}× f32) | "
              f"{r['generate_s']:.2f} | {r['train_s']:.2f} |")
    print()
print("GRPO steps of a Qwen2.5-0.5B-shaped model (random weights; 2 prompts × 4 samples, 16 new "
      f"tokens; median seconds per step over {timed}; peak resident memory of the steps, the model "
      "built before the peak is reset). grove: `grove bench --rl-step --model qwen2.5-0.5b`; PEFT + TRL: "
      "`bench/trl_figures.py` (GRPOTrainer, `bf16=True` autocast for the bf16 rows; its 4-bit base is "
      "bitsandbytes NF4, grove's is Q4_0 quantized in process):")
print()
print("| configuration | grove s/step | grove generate / train (s) | grove peak GB | TRL s/step | TRL peak GB | grove speed-up |")
print("|---|---|---|---|---|---|---|")
labels = [("f32", "full f32"), ("bf16", "full bf16"), ("lora-bf16", "LoRA r=16, bf16 base"),
          ("lora-q4", "LoRA r=16, Q4 base, bf16")]
f32 = load(out / "rl_f32.json")
for name, label in labels:
    g, t = load(out / f"rl_{name}.json"), load(out / f"trl_{name}.json")
    if g:
        rel = f" ({f32['step_s'] / g['step_s']:.2f}× f32)" if f32 and name != "f32" else ""
        gs = f"{g['step_s']:.1f}{rel} | {g['generate_s']:.1f} / {g['train_s']:.1f} | {g['peak_rss_gb']:.2f}"
    else:
        gs = f"not measured: {why(out / f'rl_{name}.log')} | | "
    missing = "not measured (below)" if (out / "notes.txt").exists() else f"not measured: {why(out / f'trl_{name}.log')}"
    ts = f"{t['step_s']:.1f} | {t['peak_rss_gb']:.2f}" if t else f"{missing} | "
    sp = f"{t['step_s'] / g['step_s']:.2f}×" if g and t else ""
    print(f"| {label} | {gs} | {ts} | {sp} |")
big = [(label, load(out / f"rl15_{name}.json"), load(out / f"trl15_{name}.json"))
       for name, label in labels if name.startswith("lora")]
if any(g for _, g, _ in big):
    print()
    print("The same work at Qwen2.5-1.5B's shapes (hidden 1536, 28 layers, 12 / 2 heads, FFN 8960; "
          "`grove bench --rl-step --model qwen2.5-1.5b`, `bench/trl_figures.py --shape qwen2.5-1.5b`). "
          "Full-parameter rows are not run: f32 weights, gradients and two AdamW moments alone take "
          "1.54 B × 16 bytes = 24.7 GB, more than this machine's memory, in grove and TRL alike:")
    print()
    print("| configuration, 1.5B shapes | grove s/step | grove generate / train (s) | grove peak GB | TRL s/step | TRL peak GB | grove speed-up |")
    print("|---|---|---|---|---|---|---|")
    for label, g, t in big:
        gs = f"{g['step_s']:.1f} | {g['generate_s']:.1f} / {g['train_s']:.1f} | {g['peak_rss_gb']:.2f}" if g else "not measured | | "
        ts = f"{t['step_s']:.1f} | {t['peak_rss_gb']:.2f}" if t else "not measured (below) | "
        sp = f"{t['step_s'] / g['step_s']:.2f}×" if g and t else ""
        print(f"| {label} | {gs} | {ts} | {sp} |")
notes = out / "notes.txt"
if notes.exists():
    print()
    print(notes.read_text().strip())
t = load(out / "trl_f32.json")
if t:
    v = t["versions"]
    print()
    print("TRL side: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)) + f", {t['threads']} threads.")
qs = [(d, out / f"quickstart_{d}.log") for d in ("f32", "bf16")]
if all(p.exists() for _, p in qs):
    print()
    print("| quickstart (`grove train`, built-in model) | held-out accuracy and wall time |")
    print("|---|---|")
    for d, p in qs:
        text = p.read_text()
        acc = re.search(r"held-out accuracy: (.*)", text)
        print(f"| model.dtype = {d} | {acc.group(1) if acc else 'n/a'} |")
PY
