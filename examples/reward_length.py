#!/usr/bin/env python3
"""An external reward for grove: correctness with a length penalty (standard library only).

grove starts this script once and keeps it running. For every response it writes one JSON
object on a line to stdin:

    {"prompt": "37+48=", "response": "85", "references": ["85"], "metadata": {...}}

and reads one line back: {"reward": <number>} (a bare number also works).

reward = 1 if the response, stripped of whitespace, equals a reference answer, else 0,
         minus 0.01 per character beyond metadata["max_chars"] (default 20).

Use it in a run config:

    [[reward.pipeline.components]]
    name = "length"
    kind = "external"
    command = ["python3", "examples/reward_length.py"]
    timeout_s = 5.0
    on_error = "fail-response"
"""
import json
import sys


def reward(req):
    response = req.get("response", "")
    references = [r.strip() for r in req.get("references") or []]
    correct = 1.0 if response.strip() in references else 0.0
    meta = req.get("metadata") or {}
    max_chars = meta.get("max_chars", 20)
    return correct - 0.01 * max(0, len(response) - max_chars)


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps({"reward": reward(json.loads(line))}), flush=True)


if __name__ == "__main__":
    main()
