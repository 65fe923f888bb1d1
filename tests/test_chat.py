"""micro-arch chat: the conversation in the KV cache, the context's limits, checkpoints by name."""


import pytest
import torch
from stage_helpers import make_run, tiny_model

from micro_arch.data.chat_template import (
    render,
)
from micro_arch.errors import MicroArchError


def naive_greedy_reply(model, tok, messages, max_new_tokens):
    """Greedy reply recomputed from the whole conversation at every token, no cache."""
    ids = render(tok, messages, add_generation_prompt=True)[0].tolist()
    new = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids + new])).logits[0, -1]
        role_tokens = list(tok.role_id.values())  # a reply may end with <|end|>, never open a turn
        logits[role_tokens] = float("-inf")
        token = int(logits.argmax())
        if token == tok.end_id:
            break
        new.append(token)
    return tok.base.decode(new)


def test_chat_keeps_the_conversation_in_the_cache(tok):
    from micro_arch.eval.chat import ChatSession

    model = tiny_model(tok.vocab_size, seq=512).eval()
    session = ChatSession(model, tok, system="CAPTAIN answers VIOLA.", temperature=0, max_new_tokens=12)
    for text in ("What country, friends, is this?", "And what should I do?"):
        history = list(session.messages) + [{"role": "user", "content": text}]
        assert session.reply(text) == naive_greedy_reply(model, tok, history, 12)
    # the cache holds exactly the rendered conversation, every turn closed
    assert session.fed == render(tok, session.messages)[0].tolist()
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_chat_drops_the_oldest_exchange_when_the_context_is_full(tok):
    from micro_arch.eval.chat import ChatSession

    model = tiny_model(tok.vocab_size, seq=96).eval()
    session = ChatSession(model, tok, system="sys", temperature=0, max_new_tokens=8)
    for i in range(6):
        session.reply(f"turn {'abc' * 5} {chr(97 + i)}")
        assert len(session.fed) <= 96 and session.fed == render(tok, session.messages)[0].tolist()
    assert session.messages[0]["role"] == "system" and session.messages[-1]["role"] == "assistant"
    assert len(session.messages) < 13
    before = list(session.messages)
    with pytest.raises(MicroArchError, match="the message is too long"):
        session.reply("x" * 200)
    assert session.messages == before  # a refused message drops no history
    with pytest.raises(MicroArchError, match="cannot be encoded"):
        session.reply("é")


@pytest.mark.parametrize("max_new_tokens", [6, 200])
def test_chat_reply_gets_the_room_the_context_has_left(tok, max_new_tokens):
    """README's example: a 58-token first turn in a small context, a budget the context cannot hold (200: was
    refused) or can hold but for the closing <|end|> (6: the end overflowed max_seq_len). The reply is cut at
    the context's end and its <|end|> still fits."""
    from micro_arch.eval.chat import ChatSession

    model = tiny_model(tok.vocab_size, seq=64).eval()
    session = ChatSession(model, tok, system="CAPTAIN answers VIOLA.", temperature=1.0,
                          max_new_tokens=max_new_tokens)
    session.allowed[tok.end_id] = False  # a model that never stops on its own: the reply uses all its room
    reply = session.reply("What country, friends, is this?")
    assert len(reply) == 64 - 58 - 1  # 58 prompt tokens, then the reply, then <|end|>
    assert session.fed == render(tok, session.messages)[0].tolist() and len(session.fed) == 64


def test_a_checkpoint_named_inside_the_run_is_found_by_chat_generate_and_eval(tmp_path):
    """--checkpoint step_N.pt (a name in RUN_DIR/checkpoints, as `run --resume --checkpoint` takes it) was
    looked up in the current folder by load_run (chat, generate, eval) and by eval.json's stamp."""
    from micro_arch.checkpoint import save_checkpoint
    from micro_arch.eval.evaluate import evaluation_stamp
    from micro_arch.rundir import load_run

    run, model, _ = make_run(tmp_path / "run")
    other = tiny_model(model.cfg.vocab_size, seed=1, seq=64)
    save_checkpoint(run / "checkpoints/step_0000002.pt", {"model": other.state_dict()})
    _, loaded, _ = load_run(run, "step_0000002.pt")
    for key, value in other.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    stamp = evaluation_stamp(run, "step_0000002.pt")
    assert stamp["checkpoint_bytes"] == (run / "checkpoints/step_0000002.pt").stat().st_size
    with pytest.raises(MicroArchError, match="no such checkpoint in .*it has: step_0000002.pt, latest.pt"):
        load_run(run, "step_0000009.pt")
