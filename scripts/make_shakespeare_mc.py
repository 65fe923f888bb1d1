"""Build the shipped local multiple-choice task tasks/shakespeare-mc/ from the held-out Shakespeare works, offline.

    python scripts/make_shakespeare_mc.py        # -> tasks/shakespeare-mc/shakespeare_mc.jsonl (committed)

"Which line comes next?": the context is a speaker's name and the line before, within one speech of a work
the pretraining split never saw (micro_arch/data/corpus.py holds out whole works); the choices are the true
next line and three lines of similar length from elsewhere in the same work, shuffled. Chance is 1/4. Short
enough for the default run's 64-character context. The task YAML beside the data reads it as
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


def questions(text: str, n: int, rng: random.Random, min_len: int = 15, max_len: int = 45) -> list[dict]:
    """n questions from one work: (speaker + previous line) -> the next line among four."""
    pool = [ln for _, body in speeches(text) for ln in body if min_len <= len(ln) <= max_len]
    candidates = [(speaker, body[i - 1], body[i]) for speaker, body in speeches(text)
                  for i in range(1, len(body)) if min_len <= len(body[i]) <= max_len and len(body[i - 1]) <= max_len]
    rows = []
    for speaker, before, answer in rng.sample(candidates, min(n, len(candidates))):
        similar = [ln for ln in pool if abs(len(ln) - len(answer)) <= 6 and ln != answer]
        choices = rng.sample(similar, 3) + [answer]
        rng.shuffle(choices)
        rows.append({"context": f"{speaker}\n{before}\n", "choices": choices, "label": choices.index(answer)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tasks/shakespeare-mc/shakespeare_mc.jsonl")
    parser.add_argument("--per-work", type=int, default=100, help="questions from each held-out work")
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
