"""Chat data for the later stages: the chat template, encoding conversations and pairs, bad records, and the dialogues built from the plays."""

import json

import pytest
import torch
from stage_helpers import (
    CONVERSATION,
    TEXT,
    write_jsonl,
)

from micro_arch.data.chat_template import (
    ChatTokenizer,
    inputs_and_targets,
    load_chat_tokenizer,
    parse,
    render,
)
from micro_arch.errors import MicroArchError
from micro_arch.stages.dpo_data import encode_pairs
from micro_arch.stages.records import read_records
from micro_arch.stages.sft_data import conversation_messages, encode_conversations


def test_template_round_trip_and_special_ids(tok, tmp_path):
    ids, trainable = render(tok, CONVERSATION)
    assert parse(tok, ids) == CONVERSATION
    assert tok.vocab_size == len(set(TEXT)) + 4 and ids.max() < tok.vocab_size
    text = tok.decode(ids)
    assert text.startswith("<|system|>PERSONS: VIOLA, CAPTAIN.<|end|><|user|>What country")
    assert text.endswith("<|assistant|>Perchance he is not drown'd.<|end|>")
    # content that spells a special token stays plain characters
    literal = [{"role": "user", "content": "<|end|>"}, {"role": "assistant", "content": "ok"}]
    lit_ids, _ = render(tok, [{"role": "user", "content": "<|end|>"}, {"role": "assistant", "content": "ok"}])
    assert (lit_ids == tok.end_id).sum() == 2 and parse(tok, lit_ids) == literal
    # saved beside the base tokenizer and loaded back from a run directory
    tok.save(tmp_path)
    again = load_chat_tokenizer(tmp_path)
    assert again.vocab_size == tok.vocab_size and parse(again, ids) == CONVERSATION


def test_trainable_positions_are_exactly_the_assistant_answers(tok):
    ids, trainable = render(tok, CONVERSATION)
    learned = tok.decode(ids[trainable])
    assert learned == "This is Illyria, lady.<|end|>Perchance he is not drown'd.<|end|>"
    x, y = inputs_and_targets(ids, trainable, seq_len=len(ids) + 10)
    assert (x[: len(ids) - 1] == ids[:-1]).all() and (x[len(ids) - 1:] == 0).all()
    assert tok.decode(y[y >= 0]) == learned and (y[len(ids) - 1:] == -1).all()


def test_bpe_tokenizer_gets_the_template_too(tmp_path):
    from micro_arch.data import SentencePieceTokenizer
    from micro_arch.data.corpus import shakespeare_documents
    from micro_arch.data.tokenizers import train_bpe

    text = shakespeare_documents()[0][0][:60000]
    base = SentencePieceTokenizer(train_bpe([text], 400), "bpe-400")
    tok = ChatTokenizer(base)
    ids, _ = render(tok, CONVERSATION)
    assert parse(tok, ids) == CONVERSATION and tok.vocab_size == 404
    assert min(tok.ids.values()) == 400


def test_unencodable_and_too_long_conversations_are_counted(tok):
    convs = [("a", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]),
             ("b", [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "yes"}]),
             ("c", [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "yes"}])]
    ex = encode_conversations(tok, convs, seq_len=20, split="training")
    assert len(ex) == 1
    assert ex.skipped == {"characters the tokenizer cannot encode": 1, "no assistant token within seq_len": 1}
    assert "1 skipped: characters the tokenizer cannot encode" in ex.report("training")
    with pytest.raises(MicroArchError, match="no usable held-out conversation"):
        encode_conversations(tok, convs[1:], seq_len=20, split="held-out")


def test_pairs_share_the_prompt_and_learn_only_the_answers(tok):
    records = [("p line 1", {"prompt": "Who goes there?", "chosen": "Nay, answer me.", "rejected": "Good night."}),
               ("p line 2", {"chosen": CONVERSATION, "rejected": CONVERSATION[:-1] + [
                   {"role": "assistant", "content": "A ship, a ship."}]})]
    pairs = encode_pairs(tok, records, seq_len=160, split="training")
    assert len(pairs) == 2
    x, y = pairs.rows(torch.tensor([0]))
    assert tok.decode(y[0][y[0] >= 0]) == "Nay, answer me.<|end|>"
    assert tok.decode(y[1][y[1] >= 0]) == "Good night.<|end|>"
    assert tok.decode(x[0][:17]) == "<|user|>Who goes there?<|end|><|assistant|>"[: len(tok.decode(x[0][:17]))]
    first_answer = int((y[0] >= 0).nonzero()[0])
    assert torch.equal(x[0][:first_answer + 1], x[1][:first_answer + 1])


@pytest.mark.parametrize("row, message", [
    ({"text": "no messages here"}, "line 2: no 'messages' list"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "line 2: message 0 has unknown role 'bot'; roles are system, user, assistant"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "line 2: message 1 is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 2: no assistant turn"),
])
def test_bad_conversations_name_the_line(tmp_path, row, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, row])
    with pytest.raises(MicroArchError, match="chat.jsonl " + message.replace("?", r"\?")) as err:
        conversation_messages(read_records(path, tmp_path, "conversations"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Who?", "chosen": "Me.", "rejected": "Me."}, "'chosen' equals 'rejected'"),
    ({"prompt": "Who?", "chosen": "Me."}, "a preference pair needs 'chosen' and 'rejected'"),
    ({"chosen": "Me.", "rejected": "You."}, "'chosen' and 'rejected' are strings, so the pair needs a 'prompt'"),
])
def test_bad_pairs_name_the_line(tmp_path, tok, row, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    with pytest.raises(MicroArchError, match=f"pairs.jsonl line 1: {message}"):
        encode_pairs(tok, read_records(path, tmp_path, "preference pairs"), 64, "training")


def test_unreadable_file_is_one_line(tmp_path, capfd):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(MicroArchError, match="empty.jsonl: no conversations in it"):
        read_records(str(tmp_path / "empty.jsonl"), tmp_path, "conversations")
    path = tmp_path / "broken.jsonl"
    good = json.dumps({"messages": CONVERSATION}) + "\n"
    path.write_text(good * 3 + '{"messages": [{"role": "user", "content": "hi"}\n' + good)
    with pytest.raises(MicroArchError, match=r"^broken.jsonl line 4: not JSON: Expecting ',' delimiter \(column 48\)"):
        read_records(str(path), tmp_path, "conversations")  # was datasets' 'An error occurred', no line
    assert "Failed to load JSON" not in capfd.readouterr().err  # nor datasets' own log line before it
    path.write_text(good + "[1, 2]\n")
    with pytest.raises(MicroArchError, match="broken.jsonl line 2: a JSON list, not an object"):
        read_records(str(path), tmp_path, "conversations")
    path.write_text(good + "\n" + good + "\n")  # blank lines are skipped, and counted in the line numbers
    assert [where for where, _ in read_records(str(path), tmp_path, "conversations")] == \
        ["broken.jsonl line 1", "broken.jsonl line 3"]


PLAY = """ACT I.

SCENE I. A room.

[Enter VIOLA and CAPTAIN.]

VIOLA.
What country, friends, is this?

CAPTAIN.
This is Illyria, lady.
[Aside.]
Be merry.

VIOLA.
And what should I do in Illyria?

SCENE II. Another room.

Ber.
Who's there?
"""


def test_builder_turns_speeches_into_exchanges_within_scenes():
    from micro_arch.stages.dialogues import exchanges, preference_pairs

    items = exchanges([("play", PLAY)], max_user_chars=200, max_answer_chars=200)
    assert [(e.speaker, e.replier) for e in items] == [("VIOLA", "CAPTAIN"), ("CAPTAIN", "VIOLA")]
    assert items[0].messages() == [{"role": "system", "content": "CAPTAIN answers VIOLA."},
                                   {"role": "user", "content": "What country, friends, is this?"},
                                   {"role": "assistant", "content": "This is Illyria, lady.\nBe merry."}]
    # clipping keeps whole lines: the end of the user's speech, the start of the reply
    clipped = exchanges([("play", PLAY)], max_user_chars=200, max_answer_chars=25)
    assert clipped[0].reply == "This is Illyria, lady."
    other = exchanges([("other", PLAY.replace("lady", "sir").replace("Illyria?", "Athens?"))], 200, 200)
    pairs = preference_pairs(items + other, seed=0)
    assert len(pairs) == 4
    for pair in pairs:
        assert pair["chosen"][:2] == pair["rejected"][:2] and pair["chosen"][2] != pair["rejected"][2]


def test_builder_script_writes_files_the_stages_read(tmp_path, tok):
    import subprocess
    import sys

    from helpers import ROOT

    result = subprocess.run([sys.executable, ROOT / "scripts/make_shakespeare_dialogues.py", "--out", tmp_path],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    val = conversation_messages(read_records(str(tmp_path / "sft_val.jsonl"), tmp_path, "conversations"))
    with open(tmp_path / "sft_train.jsonl") as f:
        train_users = {json.loads(line)["messages"][1]["content"] for line in f}
    assert len(val) > 1000 and len(train_users) > 10000
    # held-out conversations come from held-out works: no long line of theirs appears in training
    long_lines = [m[1]["content"] for _, m in val if len(m[1]["content"]) > 60]
    assert len(long_lines) > 500 and not any(line in train_users for line in long_lines)
    pairs = read_records(str(tmp_path / "dpo_val.jsonl"), tmp_path, "preference pairs")
    assert len(pairs) == len(val)
