"""Chat data from the built-in corpus: the plays are dialogue, so exchanges between speakers become
conversations (SFT) and preference pairs (DPO), split by whole works like the pretraining data.

A speech is a paragraph whose first line is a speaker's name ("VIOLA." / "Ber." / "LYSANDER") and whose
other lines are what they say (lines wholly in [brackets] are stage directions and are dropped). Within a
scene, each speech followed by a speech of another character is one exchange:

    system:    "CAPTAIN answers VIOLA."
    user:      the end of VIOLA's speech (its last lines, at most max_user_chars)
    assistant: the start of CAPTAIN's reply (its first lines, at most max_answer_chars)

A preference pair keeps the exchange's system and user turns, chooses the true reply, and rejects a reply
from another work of the same split, picked with a similar length so that length alone does not decide.
The poems and sonnets hold no speeches and give nothing.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAME = re.compile(r"[A-Z][A-Za-z'&-]*(?:(?: |, )(?:[A-Z][A-Za-z'&-]*|of|the|and|de|la|le|du))*\.?")
NOT_NAMES = {"ACT", "SCENE", "ENTER", "EXIT", "EXEUNT", "FINIS", "THE", "DRAMATIS", "INDUCTION"}


@dataclass(frozen=True)
class Exchange:
    work: str
    speaker: str
    line: str  # what the user turn says
    replier: str
    reply: str  # what the assistant turn says

    def messages(self, reply: str | None = None) -> list[dict]:
        return [{"role": "system", "content": f"{self.replier} answers {self.speaker}."},
                {"role": "user", "content": self.line},
                {"role": "assistant", "content": self.reply if reply is None else reply}]


def speaker_of(first_line: str) -> str | None:
    text = first_line.strip()
    if len(text) > 40 or not NAME.fullmatch(text) or text.split()[0].rstrip(".,").upper() in NOT_NAMES:
        return None
    return " ".join(text.rstrip(".").upper().split())


def scenes(text: str):
    """Lists of (speaker, speech) per scene, in order."""
    scene = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in paragraph.strip("\n").split("\n")]
        head = lines[0].strip()
        if head.upper().startswith(("ACT ", "SCENE ", "ACT_", "SCENE_")):
            if scene:
                yield scene
            scene = []
            continue
        speaker = speaker_of(head) if len(lines) > 1 else None
        if speaker is None:
            continue
        speech = [ln.strip() for ln in lines[1:] if ln.strip() and not re.fullmatch(r"\s*\[.*\]\s*", ln)]
        if speech:
            scene.append((speaker, speech))
    if scene:
        yield scene


def clip(lines: list[str], limit: int, from_end: bool) -> str | None:
    """Whole lines from the start (or the end) of a speech, at most `limit` characters; None if the first
    line alone is longer."""
    kept, size = [], 0
    for line in (reversed(lines) if from_end else lines):
        if size + len(line) + (1 if kept else 0) > limit:
            break
        kept.append(line)
        size += len(line) + (1 if len(kept) > 1 else 0)
    if not kept:
        return None
    return "\n".join(reversed(kept) if from_end else kept)


def exchanges(works: list[tuple[str, str]], max_user_chars: int, max_answer_chars: int) -> list[Exchange]:
    out = []
    for name, text in works:
        for scene in scenes(text):
            for (a, said), (b, reply) in zip(scene, scene[1:]):
                if a == b:
                    continue
                line, answer = clip(said, max_user_chars, from_end=True), clip(reply, max_answer_chars, False)
                if line and answer:
                    out.append(Exchange(name, a, line, b, answer))
    return out


def preference_pairs(items: list[Exchange], seed: int) -> list[dict]:
    """One pair per exchange: the true reply chosen, a reply of similar length from another work rejected."""
    rng = random.Random(seed)
    by_length = sorted(range(len(items)), key=lambda i: len(items[i].reply))
    rank = {i: r for r, i in enumerate(by_length)}
    pairs = []
    for i, ex in enumerate(items):
        for _ in range(50):  # a neighbour in length order, from another work
            j = by_length[min(max(rank[i] + rng.randint(-20, 20), 0), len(items) - 1)]
            if items[j].work != ex.work and items[j].reply != ex.reply:
                pairs.append({"chosen": ex.messages(), "rejected": ex.messages(items[j].reply)})
                break
    return pairs
