"""Writes N GSM8K/MATH-500-style (response, reference) pairs for bench/verifier.sh.

Each pair takes a real reference answer (GSM8K `#### n`, MATH-500 `answer`) and writes a
response in one of the forms models use (`\\boxed{}`, `####`, `The answer is`, Minerva's
`Final Answer: The final answer is $x$.`, a `<think>` block before the box, a MATH-500
reference solution); half the responses carry the row's answer, half the next row's answer
(so both verdicts occur). Deterministic (seeded). Standard library only.

usage: python3 bench/verifier_pairs.py DATA_DIR N OUT.jsonl
"""
import json
import random
import sys


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    data, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    gsm = [r["answer"].rsplit("#### ", 1)[1].strip() for r in rows(f"{data}/gsm8k/test.jsonl")]
    math = rows(f"{data}/math500/test.jsonl")
    rng = random.Random(15)
    templates = [
        "Let me work through it step by step.\n...\nSo the answer is $\\boxed{%s}$.",
        "Reasoning...\n#### %s",
        "We compute carefully and find the result.\nThe answer is %s.",
        "Final Answer: The final answer is $%s$. I hope it is correct.",
        "<think>Maybe 7? Let me recheck: 3 + 4 = 7, so not that.</think>\nTherefore the answer is \\boxed{%s}.",
        "**Answer:** $%s$",
    ]
    with open(out, "w") as f:
        for i in range(n):
            if i % 2 == 0:
                k = rng.randrange(len(gsm))
                reference, other = gsm[k], gsm[(k + 1) % len(gsm)]
                solution = None
            else:
                k = rng.randrange(len(math))
                reference = math[k]["answer"]
                other = math[(k + 1) % len(math)]["answer"]
                solution = math[k]["solution"]
            answer = reference if rng.random() < 0.5 else other
            if solution is not None and answer == reference and rng.random() < 0.25:
                response = solution
            else:
                response = rng.choice(templates) % answer
            f.write(json.dumps({"response": response, "reference": reference}) + "\n")


if __name__ == "__main__":
    main()
