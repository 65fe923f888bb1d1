"""`micro-arch chat RUN_DIR`: multi-turn chat with an SFT or DPO run, from a terminal or from scripted turns."""

from __future__ import annotations

import sys

from micro_arch.errors import MicroArchError
from micro_arch.eval.chat import ChatSession


def chat_command(run_dir, prompts: list[str] | None = None, system: str | None = None, max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None, seed: int = 0,
                 checkpoint=None, device: str = "auto") -> None:
    from micro_arch.data.chat_template import load_chat_tokenizer
    from micro_arch.device import resolve_device
    from micro_arch.rundir import load_run, read_run_config

    for number, text in enumerate(prompts or [], 1):
        if not text.strip():  # an empty user turn would send the template's markers alone
            which = f" (the {_ordinal(number)} of {len(prompts)})" if len(prompts) > 1 else ""
            raise MicroArchError(f"--prompt {text!r}{which} is empty; a user turn needs text")
    device = resolve_device(device, option="--device")
    read_run_config(run_dir)  # 'no such run directory' before 'no chat_template.json', as every command says it
    tok = load_chat_tokenizer(run_dir)
    _, model, _ = load_run(run_dir, checkpoint, device)
    session = ChatSession(model, tok, system=system, temperature=temperature, top_k=top_k,
                          top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)

    def show(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    if prompts:
        if system:
            print(f"system: {system}")
        for text in prompts:
            print(f"user: {text}")
            show("assistant: ")
            try:
                session.reply(text, on_text=show)
            finally:
                print()  # an error then starts on a line of its own
        return
    print(f"chatting with {run_dir} (Ctrl-D to leave)" + (f"; system: {system}" if system else ""))
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return
        if not text.strip():
            continue
        show("model> ")
        try:
            session.reply(text, on_text=show)
        except MicroArchError as err:
            print(f"\n{err}")
            continue
        print()


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
