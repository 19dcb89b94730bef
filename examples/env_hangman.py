#!/usr/bin/env python3
"""Hangman as a grove environment: the JSON-lines protocol of docs/environments.md, stdlib only.

grove starts this program (env.kind = "program", env.program = ["python3", "examples/env_hangman.py"])
and writes one JSON request per line on its stdin; the program answers each with one JSON line
on stdout. One process may hold many episodes at once, keyed by "episode".

  {"op": "reset", "episode": 7, "seed": 42}
      -> {"messages": [{"role": "user", "content": "..."}], "hidden": "word leaf"}
  ("hidden", optional: the episode's hidden state as text, never shown to the policy; an
  asymmetric PPO critic reads it with critic.privileged = "hidden")
  (with env.data = "words.jsonl", the reset also carries the row: "row": {"word": "kiwi"})
  {"op": "step", "episode": 7, "message": {"role": "assistant", "content": "e"}}
      -> {"messages": [...], "reward": 0.0, "done": false, "info": {...}}
  {"op": "close", "episode": 7}
      -> {}

Anything that goes wrong is answered with {"error": "..."}; grove ends that episode and goes on.
Copy this file and change WORDS, reset() and step() to make your own environment.
"""
import json
import random
import sys

WORDS = ["tree", "leaf", "root", "seed", "bark", "moss", "fern", "pine", "palm", "twig"]
MAX_MISSES = 6

episodes = {}


def user(content):
    return {"role": "user", "content": content}


def pattern(word, guessed):
    return " ".join(c if c in guessed else "_" for c in word)


def reset(req):
    # A dataset row (env.data) names the word; otherwise the same seed must give the same
    # episode: grove's runs are reproducible from their seed.
    row = req.get("row")
    if row is not None:
        word = str(row["word"]).lower()
    else:
        word = random.Random(req["seed"]).choice(WORDS)
    episodes[req["episode"]] = {"word": word, "guessed": set(), "misses": 0}
    return {"messages": [user(f"hangman: {pattern(word, set())}. guess one letter.")],
            "hidden": f"word {word}"}


def step(req):
    ep = episodes[req["episode"]]
    letters = [c for c in req["message"]["content"].lower() if "a" <= c <= "z"]
    if not letters:
        return {"messages": [user("reply with one letter.")], "reward": 0.0, "done": False,
                "info": {"letter": None}}
    letter = letters[0]
    hit = letter in ep["word"] and letter not in ep["guessed"]
    ep["guessed"].add(letter)
    if not hit:
        ep["misses"] += 1
    solved = all(c in ep["guessed"] for c in ep["word"])
    info = {"letter": letter, "hit": hit, "misses": ep["misses"], "success": solved}
    if solved or ep["misses"] >= MAX_MISSES:
        return {"messages": [], "reward": 1.0 if solved else 0.0, "done": True, "info": info}
    word = pattern(ep["word"], ep["guessed"])
    return {"messages": [user(f"{'yes' if hit else 'no'}: {word}")], "reward": 0.0,
            "done": False, "info": info}


def main():
    for line in sys.stdin:
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "reset":
                out = reset(req)
            elif op == "step":
                out = step(req)
            elif op == "close":
                episodes.pop(req.get("episode"), None)
                out = {}
            else:
                out = {"error": f"unknown op {op!r}"}
        except Exception as e:  # one bad request must not kill the other episodes
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
