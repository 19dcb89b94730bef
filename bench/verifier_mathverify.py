"""Math-Verify on the same pairs as grove, for bench/verifier.sh.

  throughput PAIRS.jsonl  -> verifications/second of verify(parse(gold), parse(response))
  corpus CORPUS.jsonl     -> agreement with each line's `expected` verdict

The gold answer is parsed wrapped in `$...$` (how Math-Verify's README passes gold answers);
when that yields nothing it is parsed as given. Only the verification loop is timed.
"""
import json
import sys
import time

from math_verify import parse, verify


def parse_gold(reference):
    wrapped = parse("$" + reference + "$") if "$" not in reference else []
    return wrapped if wrapped else parse(reference)


def judge(response, reference):
    try:
        return bool(verify(parse_gold(reference), parse(response)))
    except Exception:  # a crash on one pair counts as "incorrect", as a reward would
        return False


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    mode, path = sys.argv[1], sys.argv[2]
    pairs = load(path)
    if mode == "throughput":
        start = time.perf_counter()
        correct = sum(judge(p["response"], p["reference"]) for p in pairs)
        secs = time.perf_counter() - start
        print(f"math-verify: {len(pairs)} pairs in {secs:.2f} s = {len(pairs) / secs:.0f} verifications/s, "
              f"{correct} judged correct")
    elif mode == "corpus":
        agree = fp = fn = 0
        for p in pairs:
            got = judge(p["response"], p["reference"])
            agree += got == p["expected"]
            fp += got and not p["expected"]
            fn += p["expected"] and not got
        print(f"math-verify corpus: {agree}/{len(pairs)} agree ({100 * agree / len(pairs):.1f}%), "
              f"{fp} false positives, {fn} false negatives")
    else:
        sys.exit(f"unknown mode {mode!r} (expected throughput or corpus)")


if __name__ == "__main__":
    main()
