"""Build chat data from the shipped Shakespeare corpus, offline: conversations for SFT and preference pairs
for DPO, split by whole works exactly as the pretraining data is (micro_arch/data/corpus.py).

    python scripts/make_shakespeare_dialogues.py            # -> data/shakespeare-chat/{sft,dpo}_{train,val}.jsonl

See micro_arch/stages/dialogues.py for how speeches become conversations and pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from micro_arch.data.corpus import read_works, split_works
from micro_arch.stages.dialogues import exchanges, preference_pairs


def write_jsonl(path: Path, rows) -> int:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return len(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/shakespeare-chat", help="output folder")
    parser.add_argument("--max-user-chars", type=int, default=120, help="the user turn: the end of a speech")
    parser.add_argument("--max-answer-chars", type=int, default=100, help="the assistant turn: a reply's start")
    parser.add_argument("--seed", type=int, default=0, help="picks the rejected replies")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("*\n")  # generated data: rebuilt by this script, never committed
    train_works, val_works = split_works(read_works())
    for split, works in (("train", train_works), ("val", val_works)):
        items = exchanges(works, args.max_user_chars, args.max_answer_chars)
        n_conv = write_jsonl(out / f"sft_{split}.jsonl", [{"messages": ex.messages()} for ex in items])
        n_pairs = write_jsonl(out / f"dpo_{split}.jsonl", preference_pairs(items, args.seed))
        print(f"{split}: {len(works)} works -> {n_conv} conversations, {n_pairs} preference pairs")
    print(f"written to {out}/")


if __name__ == "__main__":
    main()
