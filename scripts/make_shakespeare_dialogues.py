"""Build chat data from the shipped Shakespeare corpus, offline: conversations for SFT and preference pairs
for DPO, split by whole works exactly as the pretraining data is (micro_arch/data/corpus.py).

    python scripts/make_shakespeare_dialogues.py            # -> data/shakespeare-chat/{sft,dpo}_{train,val}.jsonl

The shipped experiments need no such step: their sources `shakespeare-chat:sft_train` etc. are built into the
cache on first use with the defaults below (micro_arch/stages/builtin_chat.py). This script writes the same
files to a folder, with other clip lengths or another seed if asked. See micro_arch/stages/dialogues.py for how
speeches become conversations and pairs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from micro_arch.stages.builtin_chat import DEFAULTS, build


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/shakespeare-chat", help="output folder")
    parser.add_argument("--max-user-chars", type=int, default=DEFAULTS["max_user_chars"],
                        help="the user turn: the end of a speech")
    parser.add_argument("--max-answer-chars", type=int, default=DEFAULTS["max_answer_chars"],
                        help="the assistant turn: a reply's start")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="picks the rejected replies")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("*\n")  # generated data: rebuilt by this script, never committed
    counts = build(out, args.max_user_chars, args.max_answer_chars, args.seed)
    for split, (works, n_conv, n_pairs) in counts.items():
        print(f"{split}: {works} works -> {n_conv} conversations, {n_pairs} preference pairs")
    print(f"written to {out}/")


if __name__ == "__main__":
    main()
