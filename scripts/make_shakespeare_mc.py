"""Build the shipped local multiple-choice task tasks/shakespeare-mc/ from the held-out Shakespeare works, offline.

    python scripts/make_shakespeare_mc.py        # -> tasks/shakespeare-mc/shakespeare_mc.jsonl (committed)

"Which word ends the line?" (LAMBADA's last-word prediction, as multiple choice): the context is a line and
the next line of the same speech without its last word, from works the pretraining split never saw
(micro_arch/data/corpus.py holds out whole works); the choices are that word and three last words of other
lines of the same work, of the same length give or take a letter, shuffled. Chance is 1/4. Contexts stay
within 60 characters, so the default run's 64-character context sees most of them. The task YAML beside the data reads it as
`dataset_path: json` with a local data file, so lm-eval needs no network.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from micro_arch.data.corpus import read_works, split_works

SPEAKER = re.compile(r"^[A-Z][A-Z' ,.-]*\.$")  # 'SIR TOBY.', 'FIRST OFFICER.'


def speeches(text: str):
    """(speaker, verse lines) of every speech: a name line, then its lines up to a blank line."""
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if len(lines) >= 3 and SPEAKER.match(lines[0]):
            body = [ln for ln in lines[1:] if ln.strip() and not ln.lstrip().startswith("[")]
            if len(body) >= 2:
                yield lines[0], body


LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z']{3,})([^A-Za-z']*)$")  # the line, its last word, what follows it


def questions(text: str, n: int, rng: random.Random, max_context: int = 60) -> list[dict]:
    """n questions from one work: the line before and a line without its last word -> that word among four
    (LAMBADA's last-word prediction as multiple choice). The distractors are last words of other lines of the
    same work, of the same length give or take one letter."""
    candidates = []
    for _, body in speeches(text):
        for i in range(1, len(body)):
            found = LAST_WORD.match(body[i])
            if found:
                context = f"{body[i - 1].strip()}\n{found.group(1).strip()}"
                if len(context) <= max_context:
                    candidates.append((context, found.group(2)))
    words = sorted({word for _, word in candidates})
    rows = []
    for context, answer in rng.sample(candidates, len(candidates)):
        similar = [w for w in words if abs(len(w) - len(answer)) <= 1 and w.lower() != answer.lower()]
        if len(rows) == n:
            break
        if len(similar) < 3:  # a long rare word: no three like it
            continue
        choices = rng.sample(similar, 3) + [answer]
        rng.shuffle(choices)
        rows.append({"context": context, "choices": [" " + c for c in choices], "label": choices.index(answer)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tasks/shakespeare-mc/shakespeare_mc.jsonl")
    parser.add_argument("--per-work", type=int, default=200, help="questions from each held-out work")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    _, held_out = split_works(read_works())
    rows = [row for _, text in held_out for row in questions(text, args.per_work, rng)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} questions from {len(held_out)} held-out works ({', '.join(n for n, _ in held_out)}) -> {out}")


if __name__ == "__main__":
    main()
