#!/usr/bin/env bash
# grove's math verifier against Math-Verify (Python, SymPy) in one run:
# - throughput: verifications/second on the same N (default 10,000) GSM8K/MATH-500-style pairs;
#   grove is timed as a whole `grove verify --pairs` process (startup, JSON in/out included,
#   median of 3 runs), Math-Verify only over its verify(parse(gold), parse(response)) loop;
# - accuracy: agreement of each with tests/data/verifier_corpus.jsonl's expected verdicts.
# Not a test: CI does not run it. Figures go to docs/verifier.md.
# usage: bash bench/verifier.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
DATA=${GROVE_DATA:-../shared/data}
OUT=target/verifier-bench
mkdir -p "$OUT"
bash .ci/install-verifier.sh
PY=${GROVE_PYTHON:-.ci/venv/bin/python}
cargo build --release --bin grove 2>&1 | tail -1
echo "CPU: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p'), $(nproc) cores"
python3 bench/verifier_pairs.py "$DATA" "$N" "$OUT/pairs.jsonl"

python3 - "$OUT" <<'PY'
import json, subprocess, sys, time
out = sys.argv[1]
times = []
for _ in range(3):
    start = time.perf_counter()
    with open(f"{out}/grove.jsonl", "w") as f:
        subprocess.run(["target/release/grove", "verify", "--pairs", f"{out}/pairs.jsonl"], stdout=f, check=True)
    times.append(time.perf_counter() - start)
secs = sorted(times)[1]
lines = open(f"{out}/grove.jsonl").read().splitlines()
n = len(lines) - 1
correct = sum(json.loads(l)["correct"] for l in lines[:-1])
print(f"grove:       {n} pairs in {secs:.2f} s = {n / secs:.0f} verifications/s, {correct} judged correct "
      f"(median of 3 runs: {', '.join(f'{t:.2f}' for t in times)} s)")
PY
"$PY" bench/verifier_mathverify.py throughput "$OUT/pairs.jsonl"

target/release/grove verify --pairs tests/data/verifier_corpus.jsonl > "$OUT/corpus-grove.jsonl"
python3 - "$OUT/corpus-grove.jsonl" tests/data/verifier_corpus.jsonl <<'PY'
import json, sys
got = [json.loads(l)["correct"] for l in open(sys.argv[1]).read().splitlines()[:-1]]
want = [json.loads(l)["expected"] for l in open(sys.argv[2]) if l.strip()]
agree = sum(g == w for g, w in zip(got, want))
fp = sum(g and not w for g, w in zip(got, want))
fn = sum(w and not g for g, w in zip(got, want))
print(f"grove corpus:       {agree}/{len(want)} agree ({100 * agree / len(want):.1f}%), {fp} false positives, {fn} false negatives")
PY
"$PY" bench/verifier_mathverify.py corpus tests/data/verifier_corpus.jsonl
