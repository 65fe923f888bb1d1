"""The stages after pretraining: chat template, SFT masking, DPO loss, their data and their errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from micro_arch.config import LayerGroup, ModelConfig
from micro_arch.data import CharTokenizer
from micro_arch.data.chat_template import (
    ChatTokenizer,
    inputs_and_targets,
    load_chat_tokenizer,
    parse,
    render,
)
from micro_arch.errors import MicroArchError
from micro_arch.model.model import Model
from micro_arch.stages.dpo_data import encode_pairs
from micro_arch.stages.losses import dpo_objective, sequence_logprobs, sft_loss
from micro_arch.stages.records import read_records
from micro_arch.stages.sft_data import ConversationBatches, conversation_messages, encode_conversations

TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'-<>|\n"
CONVERSATION = [
    {"role": "system", "content": "PERSONS: VIOLA, CAPTAIN."},
    {"role": "user", "content": "What country, friends, is this?"},
    {"role": "assistant", "content": "This is Illyria, lady."},
    {"role": "user", "content": "And what should I do in Illyria?"},
    {"role": "assistant", "content": "Perchance he is not drown'd."},
]


@pytest.fixture
def tok():
    return ChatTokenizer(CharTokenizer(TEXT))


def tiny_model(vocab_size, seed=0, seq=256):
    torch.manual_seed(seed)
    return Model(ModelConfig(d_model=32, n_heads=2, max_seq_len=seq, vocab_size=vocab_size,
                             layers=[LayerGroup("Norm->Attn->+->Norm->MLP->+", 1)]))


def tiny_model_section(max_seq_len, **more):
    """The model section of the tiny experiments here: one pre-norm layer of width 32."""
    return {"d_model": 32, "n_heads": 2, "max_seq_len": max_seq_len,
            "layers": [{"spec": "Norm->Attn->+->Norm->MLP->+", "repeat": 1}], **more}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- the template ---------------------------------------------------------------------------------


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


# --- SFT: masking, padding, normalisation ---------------------------------------------------------


def test_sft_loss_counts_only_assistant_tokens(tok):
    """The gradient of the loss reaches only the logits that predict assistant tokens: a user or system
    token leaking into the loss would give its position a gradient."""
    model = tiny_model(tok.vocab_size)
    ids, trainable = render(tok, CONVERSATION)
    x, y = inputs_and_targets(ids, trainable, seq_len=len(ids) + 5)
    x, y = torch.from_numpy(x)[None], torch.from_numpy(y)[None]
    kept = {}

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg = model.cfg

        def forward(self, idx):
            out = model(idx)
            out.logits.retain_grad()
            kept["logits"] = out.logits
            return out

    loss, metrics = sft_loss(Spy(), (x, y, 1 / int((y >= 0).sum())))
    loss.backward()
    grad_rows = kept["logits"].grad[0].abs().sum(-1) > 0
    predicts_assistant = torch.from_numpy(trainable[1:])
    predicts_assistant = F.pad(predicts_assistant, (0, x.size(1) - len(predicts_assistant)))
    assert torch.equal(grad_rows, predicts_assistant)
    # and the value is the mean negative log-likelihood of those tokens, computed naively
    logp = torch.log_softmax(kept["logits"][0].detach().float(), -1)
    positions = [t for t in range(len(ids) - 1) if trainable[t + 1]]
    expected = -sum(logp[t, ids[t + 1]] for t in positions) / len(positions)
    assert float(metrics["train_loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_padding_after_the_end_changes_no_logit(tok):
    model = tiny_model(tok.vocab_size).eval()
    ids, trainable = render(tok, CONVERSATION)
    x, _ = inputs_and_targets(ids, trainable, seq_len=len(ids) + 20)
    padded = model(torch.from_numpy(x)[None]).logits[0, : len(ids) - 1]
    alone = model(torch.from_numpy(ids[:-1])[None]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_sft_loss_on_shards_of_the_global_batch_sums_to_the_whole(tok):
    """DDP averages gradients over ranks: rank losses normalised by the global token count then give
    exactly the gradient of one process holding the whole batch."""
    convs = [("c", [{"role": "user", "content": "ab" * i}, {"role": "assistant", "content": "xyz" * (i + 1)}])
             for i in range(1, 5)]
    ex = encode_conversations(tok, convs, seq_len=40, split="training")
    model = tiny_model(tok.vocab_size)
    one = ConversationBatches(ex, batch_size=4, seed=3)
    x, y, scale = one.batch(7)
    assert scale == 1 / int((y >= 0).sum())
    sft_loss(model, (x, y, scale))[0].backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for rank in range(2):
        batch = ConversationBatches(ex, batch_size=2, seed=3, rank=rank, world_size=2).batch(7)
        assert batch[2] == 2 * scale
        (sft_loss(model, batch)[0] / 2).backward()  # DDP's average over the two ranks
    for a, b in zip(whole, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


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


# --- DPO --------------------------------------------------------------------------------------------


def test_dpo_loss_matches_a_hand_computed_value():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    beta = 0.5
    # pair 1: 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5; pair 2: 0.5 * ((-3 + 2) - (-1 + 2)) = -1
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2
    loss, m = dpo_objective(pc, pr, rc, rr, beta)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(m["reward_margin"]) == pytest.approx(-0.25)
    assert float(m["preference_accuracy"]) == 0.5
    assert float(m["reward_chosen"]) == pytest.approx((0.25 - 0.5) / 2)


def test_sequence_logprobs_sum_the_answer_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    y = torch.tensor([[-1, 3, 4, -1, -1], [-1, -1, 6, 0, 2]])
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([logp[0, 1, 3] + logp[0, 2, 4], logp[1, 2, 6] + logp[1, 3, 0] + logp[1, 4, 2]])
    torch.testing.assert_close(sequence_logprobs(logits, y), expected)


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


# --- bad input: one clear line each -------------------------------------------------------------------


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


# --- the Shakespeare dialogue builder ------------------------------------------------------------------

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


# --- chat ----------------------------------------------------------------------------------------------


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


# --- eval and compare on any text --------------------------------------------------------------------


def make_run(folder, seed=0, chars=TEXT, extra=None):
    """A run directory by hand: config, tokenizer and a checkpoint of a random tiny model."""
    from micro_arch.checkpoint import save_checkpoint
    from micro_arch.config import ExperimentConfig
    from micro_arch.rundir import write_config

    folder.mkdir(parents=True)
    base = CharTokenizer(chars)
    cfg = ExperimentConfig(name="tiny")
    cfg.model = ModelConfig(d_model=32, n_heads=2, max_seq_len=64, vocab_size=base.vocab_size + (extra or 0),
                            layers=[LayerGroup("Norm->Attn->+->Norm->MLP->+", 1)])
    cfg.train.seq_len = 32
    write_config(folder, cfg)
    base.save(folder)
    model = tiny_model(cfg.model.vocab_size, seed=seed, seq=64)
    save_checkpoint(folder / "checkpoints/latest.pt", {"model": model.state_dict()})
    return folder, model, base


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


def test_eval_on_any_text_counts_what_the_tokenizer_cannot_encode(tmp_path):
    from helpers import run_cli

    from micro_arch.eval.evaluate import evaluate
    from micro_arch.eval.text import evaluate_on_data

    run, model, base = make_run(tmp_path / "run")
    text = "Où est la gare? Wie schön!\n\nNo accents here, friend."
    (tmp_path / "other.txt").write_text(text)
    result = evaluate_on_data(run, str(tmp_path / "other.txt"), device="cpu")
    outside = [c for c in text if c not in TEXT]
    assert result["unencodable"] == len(outside) == 2 and result["characters"] == len(text) - 2  # minus "\n\n"
    assert sorted(c for c, _ in result["unencodable_top"]) == sorted(set(outside))
    kept = "".join(c for c in text if c in TEXT)
    expected = evaluate(model.eval(), base.encode_array(kept), 32, 32, "cpu", tokenizer=base)
    assert result["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    assert result["n_bytes"] == len(kept.encode()) - 1  # every byte but the first is predicted
    out = run_cli("eval", run, "--data", tmp_path / "other.txt", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "2 of 50 characters (4.00%) cannot be encoded" in out.stdout.replace("\n", " ")


def test_eval_and_compare_data_take_a_text_field(tmp_path):
    """A .jsonl whose text is not in 'text': the error names the option that fixes it (eval and compare take
    no --set), and --text-field gives the same numbers as the same text in a .txt file."""
    from helpers import run_cli

    run, _, _ = make_run(tmp_path / "run")
    docs = ["the quick brown fox.", "jumps over the lazy dog."]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    for command in ("eval", "compare"):
        out = run_cli(command, run, "--data", tmp_path / "a.jsonl", *(["--device", "cpu"] if command == "eval" else []))
        assert out.returncode == 2 and "no column 'text' (columns: body); set --text-field" in out.stderr, out.stderr
    as_txt = run_cli("eval", run, "--data", tmp_path / "a.txt", "--device", "cpu")
    as_jsonl = run_cli("eval", run, "--data", tmp_path / "a.jsonl", "--text-field", "body", "--device", "cpu")
    assert as_jsonl.returncode == 0, as_jsonl.stderr
    table = [line for line in as_jsonl.stdout.splitlines() if "bits" in line or "loss" in line]
    assert table and table == [line for line in as_txt.stdout.splitlines() if "bits" in line or "loss" in line]
    ranked = run_cli("compare", run, "--data", tmp_path / "a.jsonl", "--text-field", "body")
    assert ranked.returncode == 0, ranked.stderr


def test_compare_on_data_ranks_runs_in_bits_per_byte(tmp_path):
    from micro_arch.eval.text import compare_on_data, evaluate_on_data

    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 8)
    runs = [str(make_run(tmp_path / f"run{i}", seed=i)[0]) for i in range(3)]
    rows = compare_on_data(runs, str(tmp_path / "a.txt"), out=tmp_path / "report")
    each = {r: evaluate_on_data(r, str(tmp_path / "a.txt"))["bits_per_byte"] for r in runs}
    assert [r["run"] for r in rows] == sorted(runs, key=each.get)
    assert [r["bits_per_byte"] for r in rows] == pytest.approx(sorted(each.values()))
    assert (tmp_path / "report/data_ranking.md").read_text().count("| ") > 10


# --- the stages' wiring: reference model, precomputed log-probs ------------------------------------------


def stage_config(tmp_path, stage, source, parent, **train):
    from micro_arch.config import ExperimentConfig, from_dict

    cfg = from_dict(ExperimentConfig, {
        "model": tiny_model_section(64, vocab_size=len(set(TEXT)) + 4, init_from=str(parent)),
        "data": {"source": source, "val_source": source, "cache_dir": str(tmp_path / "cache")},
        "train": {"stage": stage, "seq_len": 64, "batch_size": 2, "eval_batches": 1, **train}})
    return cfg


PAIRS = [{"prompt": "Who goes there?", "chosen": "Nay, answer me.", "rejected": "Good night."},
         {"prompt": "What is the hour?", "chosen": "Twelve, my lord.", "rejected": "A ship, a ship."},
         {"prompt": "Is it the king?", "chosen": "It is.", "rejected": "Go to, go to."}]


def test_dpo_reference_stays_frozen_while_the_policy_trains(tmp_path):
    from micro_arch.hf.init import load_initial_weights
    from micro_arch.stages import stage_of

    parent, _, _ = make_run(tmp_path / "parent")
    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = stage_config(tmp_path, "dpo", source, parent, dpo_beta=0.5)
    data = stage_of(cfg).prepare_data(cfg)
    assert len(data.train) == 3 and data.tokenizer.vocab_size == cfg.model.vocab_size
    stage = stage_of(cfg).pieces(cfg, data, torch.device("cpu"))
    policy = Model(cfg.model)
    load_initial_weights(policy, cfg.model)
    start = {k: v.clone() for k, v in stage.reference.state_dict().items()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for step in range(4):
        loss, metrics = stage.loss_fn(policy, stage.source.batch(step))
        if step == 0:  # the policy starts as the reference: every implicit reward is 0
            assert float(loss.detach()) == pytest.approx(math.log(2), rel=1e-5)
            assert float(metrics["dpo/reward_margin"]) == pytest.approx(0, abs=1e-5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(loss.detach()) < math.log(2)
    assert not stage.reference.training and not any(p.requires_grad for p in stage.reference.parameters())
    for k, v in stage.reference.state_dict().items():
        assert torch.equal(v, start[k]), k
    assert any(not torch.equal(v, start[k]) for k, v in policy.state_dict().items())
    val_loss, extra = stage.held_out(policy)
    assert val_loss < math.log(2) and extra["val/preference_accuracy"] > 0.5
    # the reference's log-probabilities computed once give the same losses
    cfg.train.dpo_precompute_reference = True
    ahead = stage_of(cfg).pieces(cfg, data, torch.device("cpu"))
    for step in range(3):
        batch = ahead.source.batch(step)
        assert batch[2] is not None
        torch.testing.assert_close(ahead.loss_fn(policy, batch)[0], stage.loss_fn(policy, stage.source.batch(step))[0])


def test_dpo_straight_from_a_pretraining_run_warns(tmp_path, capsys):
    """Issue 25: DPO from a run that never saw the chat template runs, and says that DPO usually follows SFT."""
    from micro_arch.rundir import read_run_config, write_config
    from micro_arch.stages import stage_of

    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    pretrained, _, _ = make_run(tmp_path / "pretrained")
    cfg = stage_config(tmp_path, "dpo", source, pretrained)
    stage_of(cfg).prepare_data(cfg)
    err = capsys.readouterr().err
    assert f"warning: train.stage=dpo starts from {pretrained}, a pretraining run" in err and "SFT" in err, err
    sft, _, _ = make_run(tmp_path / "sft")
    cfg = read_run_config(sft)
    cfg.train.stage = "sft"
    write_config(sft, cfg)
    cfg = stage_config(tmp_path, "dpo", source, sft)
    stage_of(cfg).prepare_data(cfg)
    assert "warning" not in capsys.readouterr().err


def test_a_reference_that_trained_on_since_the_run_began_is_refused(tmp_path):
    """DPO's resumed reference and eval's 'before' are init_from's weights as the run began: when the parent run
    has trained on (its latest.pt moved), say so and name the parent's checkpoint of that step."""
    from micro_arch.checkpoint import save_checkpoint
    from micro_arch.hf.init import load_initial_weights
    from micro_arch.stages.setup import build_reference

    parent, model, _ = make_run(tmp_path / "parent")
    began = {"model": model.state_dict(), "step": 5}
    save_checkpoint(parent / "checkpoints/latest.pt", began, also=parent / "checkpoints/step_0000005.pt")
    cfg = stage_config(tmp_path, "dpo", "unused.jsonl", parent)
    cfg.model.vocab_size = model.cfg.vocab_size
    child = tmp_path / "child"
    child.mkdir()
    load_initial_weights(Model(cfg.model), cfg.model, child)  # what a fresh run does: parent.json, step 5
    build_reference(cfg, "cpu", child)
    later = tiny_model(model.cfg.vocab_size, seed=1, seq=64).state_dict()
    save_checkpoint(parent / "checkpoints/latest.pt", {"model": later, "step": 7})  # the parent trained on
    with pytest.raises(MicroArchError, match=r"now step 7 .* began from step 5 .*model.init_from=.*step_0000005.pt"):
        build_reference(cfg, "cpu", child)
    with pytest.raises(MicroArchError, match=r"edit model.init_from in .*child.config.yaml to .*step_0000005.pt"):
        build_reference(cfg, "cpu", child, evaluating=True)
    cfg.model.init_from = str(parent / "checkpoints/step_0000005.pt")
    reference = build_reference(cfg, "cpu", child)
    for key, value in model.state_dict().items():
        assert torch.equal(reference.state_dict()[key], value), key
    began = json.loads((child / "parent.json").read_text())
    (child / "parent.json").write_text(json.dumps({**began, "step": None}))  # a parent saved without its step
    cfg.model.init_from = str(parent)
    build_reference(cfg, "cpu", child)  # nothing to compare: no check, and no crash


def test_stages_need_a_run_to_start_from(tmp_path):
    from micro_arch.stages import stage_of

    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = stage_config(tmp_path, "dpo", source, "x")
    cfg.model.init_from = None
    with pytest.raises(MicroArchError, match="train.stage=dpo needs model.init_from"):
        stage_of(cfg).prepare_data(cfg)


# --- context extension --------------------------------------------------------------------------------


def test_position_interpolation_turns_position_p_as_p_over_the_factor():
    from micro_arch.blocks.attention import rope_tables

    plain, scaled = rope_tables(16, 64, 10000.0), rope_tables(16, 128, 10000.0, scaling=2.0)
    torch.testing.assert_close(scaled[0::2], plain)
    # every position, odd ones included, turns by half its plain angle: squared, the plain rotation
    torch.testing.assert_close(scaled ** 2, rope_tables(16, 128, 10000.0), rtol=1e-4, atol=1e-4)


def test_context_extension_from_a_run_reports_both_lengths(tmp_path):
    from micro_arch.eval.context import context_lines, extended_from
    from micro_arch.hf.init import load_initial_weights

    parent, small, base = make_run(tmp_path / "parent")
    cfg = ModelConfig(d_model=32, n_heads=2, max_seq_len=128, vocab_size=base.vocab_size, rope_scaling=2.0,
                      layers=[LayerGroup("Norm->Attn->+->Norm->MLP->+", 1)], init_from=str(parent))
    model = Model(cfg)
    run = tmp_path / "extended"
    run.mkdir()
    provenance = load_initial_weights(model, cfg, run)
    assert provenance["changed"]["max_seq_len"] == [64, 128] and extended_from(run) == 64
    assert provenance["changed"]["rope_scaling"] == [1.0, 2.0]  # parent.json says what the run changed
    torch.testing.assert_close(model.state_dict()["embed.weight"], small.state_dict()["embed.weight"])
    tokens = base.encode_array("the quick brown fox jumps over the lazy dog. " * 20)
    lines = context_lines(run, model.eval(), tokens, 128, 8, "cpu")
    assert len(lines) == 2 and "64-token windows (the parent's length)" in lines[0]
    assert "128-token windows (this run's length)" in lines[1]
    assert context_lines(tmp_path / "parent", small, tokens, 64, 8, "cpu") == []


# --- end to end: pretrain -> sft -> dpo through `micro-arch run` ------------------------------------------

PRETRAIN = yaml.safe_dump({
    "model": tiny_model_section(32), "data": {"source": "shakespeare", "tokenizer": "char"},
    "train": {"batch_size": 4, "seq_len": 32, "max_steps": 8, "warmup_steps": 2, "eval_every": 8, "eval_batches": 1,
              "log_every": 4, "sample": {"prompts": ["A"], "max_new_tokens": 4}}})

STAGE = """
extends: ../pretrain/config.yaml
model: {{max_seq_len: 160, dropout: 0.1}}
data: {{source: {train}, val_source: {val}}}
train: {{stage: {stage}, seq_len: 160, batch_size: 4, max_steps: 8, lr: 1.0e-3, warmup_steps: 2, eval_every: 4,
        eval_batches: 1, log_every: 2, checkpoint_every: 4}}
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny pretrain run, and SFT/DPO experiments (with their data) that start from it."""
    from micro_arch.commands.run import run_experiment
    from micro_arch.data.corpus import read_works
    from micro_arch.stages.dialogues import exchanges, preference_pairs

    root = tmp_path_factory.mktemp("chain")
    items = [e for w in read_works()[3:5] for e in exchanges([w], max_user_chars=60, max_answer_chars=50)[:30]]
    for name, rows in (("sft", [{"messages": e.messages()} for e in items]), ("dpo", preference_pairs(items, 0))):
        write_jsonl(root / f"{name}_train.jsonl", rows[:48])
        write_jsonl(root / f"{name}_val.jsonl", rows[48:])
    for name, text in (("pretrain", PRETRAIN), *((s, STAGE.format(stage=s, train=root / f"{s}_train.jsonl",
                                                                  val=root / f"{s}_val.jsonl")) for s in ("sft", "dpo"))):
        (root / name).mkdir()
        (root / name / "config.yaml").write_text(text)
    parent = run_experiment(root / "pretrain", runs_root=root / "runs")
    return root, parent


def check_resume_is_exact(exp, overrides, full, tmp_path):
    import shutil

    from micro_arch.commands.run import run_experiment

    stopped = tmp_path / "stopped"
    shutil.copytree(full, stopped)
    shutil.copy(stopped / "checkpoints/step_0000004.pt", stopped / "checkpoints/latest.pt")
    (stopped / "checkpoints/step_0000008.pt").unlink()
    run_experiment(exp, runs_root=tmp_path / "runs", overrides=overrides, resume=stopped)
    torch.testing.assert_close(losses(stopped), losses(full), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert [r["tokens"] for r in read_metrics(stopped)] == [r["tokens"] for r in read_metrics(full)]
    weights = [torch.load(run / "checkpoints/latest.pt", weights_only=True)["model"] for run in (stopped, full)]
    torch.testing.assert_close(*weights, rtol=1e-5, atol=1e-6)


def assert_tokens_count_trimmed_batches(pretrain, stage_run, rows_per_step):
    """Pretraining counts batch x seq_len per step; a stage counts the positions of its batches, which are
    trimmed to their longest row: fewer than batch x seq_len, and rows_per_step rows each time."""
    pre = [int(r["tokens"]) for r in read_metrics(pretrain)]
    assert pre == [int(r["step"]) * 4 * 32 for r in read_metrics(pretrain)]
    rows = read_metrics(stage_run)
    tokens = [int(r["tokens"]) for r in rows]
    assert all(a < b for a, b in zip([0] + tokens, tokens))
    assert all(t % rows_per_step == 0 and t < int(r["step"]) * rows_per_step * 160 for t, r in zip(tokens, rows))
    summary = json.loads((stage_run / "summary.json").read_text())
    assert summary["tokens_seen"] == tokens[-1]


def read_metrics(run_dir):
    import csv

    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def losses(run_dir) -> torch.Tensor:
    """Step, training loss and held-out loss of every row of metrics.csv (nan where a row has none)."""
    return torch.tensor([[float(row[k] or "nan") for k in ("step", "train_loss", "val_loss")]
                         for row in read_metrics(run_dir)], dtype=torch.float64)


def test_sft_then_dpo_runs_resume_exactly_and_chat(chain, tmp_path):
    import subprocess
    import sys

    from helpers import ROOT, run_cli

    from micro_arch.commands.run import run_experiment

    root, parent = chain
    sft_over = [f"model.init_from={parent}"]
    sft = run_experiment(root / "sft", runs_root=tmp_path / "runs", overrides=sft_over)
    assert (sft / "chat_template.json").is_file()
    assert json.loads((sft / "parent.json").read_text())["changed"]["vocab_size"] == [
        len(load_chat_tokenizer(sft).base.chars), load_chat_tokenizer(sft).vocab_size]
    rows = read_metrics(sft)
    assert [bool(r["val_loss"]) for r in rows] == [False, True, False, True]
    # the end-of-run sample of a chat model is its reply to the prompt as a user turn, as `chat` gives it
    from micro_arch.eval.chat import ChatSession
    from micro_arch.rundir import load_run

    (sample,) = json.loads((sft / "samples.json").read_text())
    cfg, model, _ = load_run(sft)
    s = cfg.train.sample
    expected = ChatSession(model, load_chat_tokenizer(sft), temperature=s.temperature, top_k=s.top_k,
                           max_new_tokens=s.max_new_tokens, seed=cfg.train.seed).reply(s.prompts[0])
    assert sample == {"prompt": "A", "text": expected, "as": "assistant reply"} and "<|" not in expected
    assert_tokens_count_trimmed_batches(parent, sft, rows_per_step=4)
    check_resume_is_exact(root / "sft", sft_over, sft, tmp_path / "sft-resume")

    dpo_over = [f"model.init_from={sft}"]
    dpo = run_experiment(root / "dpo", runs_root=tmp_path / "runs", overrides=dpo_over)
    rows = read_metrics(dpo)
    assert rows[0]["dpo/reward_margin"] and rows[1]["val/preference_accuracy"]
    assert_tokens_count_trimmed_batches(parent, dpo, rows_per_step=8)  # chosen and rejected rows
    check_resume_is_exact(root / "dpo", dpo_over, dpo, tmp_path / "dpo-resume")

    out = run_cli("chat", sft, "--prompt", "Who goes there?", "--prompt", "Speak!", "--max-new-tokens", "8",
                  "--system", "HORATIO answers BERNARDO.", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("assistant: ") == 2 and "user: Speak!" in out.stdout
    interactive = subprocess.run([sys.executable, "-m", "micro_arch", "chat", str(sft), "--max-new-tokens", "4",
                                  "--device", "cpu"], input="Who goes there?\n\n", capture_output=True, text=True,
                                 timeout=300, cwd=ROOT)
    assert interactive.returncode == 0 and interactive.stdout.count("you> ") == 3, interactive.stderr  # Ctrl-D
    assert interactive.stdout.count("model> ") == 1
    with pytest.raises(MicroArchError, match="not trained with the chat template"):
        load_chat_tokenizer(parent)
    from micro_arch.eval.evaluate import evaluate_run

    with pytest.raises(MicroArchError, match="measured on held-out conversations, not text"):
        evaluate_run(sft)  # what compare calls: a stage run is left out with this line
    out = run_cli("eval", dpo, "--device", "cpu", "--batch-size", "8")
    assert out.returncode == 0, out.stderr
    result = json.loads((dpo / "stage_eval.json").read_text())
    assert result["before"]["reward_margin"] == 0 and result["after"]["pairs"] == 12


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_ddp_two_processes_equal_one_process(chain, tmp_path, stage):
    from helpers import run_cli

    from micro_arch.commands.run import run_experiment

    root, parent = chain
    start = parent
    if stage == "dpo":
        start = run_experiment(root / "sft", runs_root=tmp_path / "sft",
                               overrides=[f"model.init_from={parent}", "train.max_steps=2"])
    common = [f"model.init_from={start}", "train.max_steps=4", "model.dropout=0.0"]
    one = run_experiment(root / stage, runs_root=tmp_path / "one", overrides=common + ["train.batch_size=4"])
    result = run_cli("run", root / stage, "--nproc", "2", "--runs-dir", tmp_path / "two", "--set", *common,
                     "train.batch_size=2", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (two,) = (tmp_path / "two" / stage).iterdir()
    a, b = read_metrics(one), read_metrics(two)
    assert len(a) == len(b) == 2
    assert [bool(r["val_loss"]) for r in a] == [bool(r["val_loss"]) for r in b] == [False, True]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            if ra[key]:
                assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-4), key


def test_init_from_another_architecture_is_one_line(chain, tmp_path):
    from helpers import run_cli

    root, parent = chain
    out = run_cli("run", root / "sft", "--runs-dir", tmp_path / "runs", "--set", f"model.init_from={parent}",
                  "model.d_model=48")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "d_model" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


# --- SFT and DPO from a local Hugging Face folder --------------------------------------------------------

LLAMA_SECTION = {"d_model": 32, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64, "max_seq_len": 128,
                 "tie_embeddings": False, "defaults": {"Norm": "rmsnorm(eps=1e-6)"},
                 "layers": [{"spec": "Norm->Attn->+->Norm->MLP->+", "repeat": 2}]}
DIALOGUE = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}] for p in PAIRS]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny LlamaForCausalLM saved by transformers, with a byte-level BPE tokenizer (BOS added by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for c in [*DIALOGUE, CONVERSATION] for m in c] * 4
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         rms_norm_eps=1e-6, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def folder_experiment(folder, tmp_path, stage, rows, **train):
    """An experiment folder: the model section the Llama folder needs, `rows` as training and held-out data."""
    data = write_jsonl(tmp_path / f"{stage}.jsonl", rows)
    exp = tmp_path / f"{stage}-from-hf"
    exp.mkdir()
    (exp / "config.yaml").write_text(yaml.safe_dump({
        "model": {**LLAMA_SECTION, "init_from": str(folder)}, "data": {"source": data, "val_source": data},
        "train": {"stage": stage, "seq_len": 96, "batch_size": 4, "max_steps": 10, "lr": 3e-3, "warmup_steps": 1,
                  "eval_every": 10, "eval_batches": 1, "log_every": 5, "checkpoint_every": 10,
                  "sample": {"prompts": ["Who"], "max_new_tokens": 4}, **train}}))
    return exp


def test_sft_from_a_hugging_face_folder_learns_with_its_tokenizer(llama_folder, tmp_path):
    from transformers import AutoTokenizer

    from micro_arch.commands.run import run_experiment
    from micro_arch.experiment import load_experiment
    from micro_arch.hf.export import export_run
    from micro_arch.stages.evaluate_stage import evaluate_stage_run
    from micro_arch.stages.setup import stage_tokenizer

    rows = [{"messages": c} for c in [*DIALOGUE, CONVERSATION]]
    exp = folder_experiment(llama_folder, tmp_path, "sft", rows)
    run = run_experiment(exp, runs_root=tmp_path / "runs")
    rows_in_folder = AutoTokenizer.from_pretrained(llama_folder).backend_tokenizer.get_vocab_size()
    parent = json.loads((run / "parent.json").read_text())
    assert parent["type"] == "huggingface" and parent["changed"]["vocab_size"] == [rows_in_folder, rows_in_folder + 4]
    # the run keeps the folder's tokenizer (content without its BOS) and puts the template's tokens after it
    chat, theirs = load_chat_tokenizer(run), AutoTokenizer.from_pretrained(llama_folder)
    text = "Nay, answer me: stand, and unfold yourself."
    assert chat.encode(text) == theirs(text, add_special_tokens=False)["input_ids"] == theirs(text)["input_ids"][1:]
    assert chat.decode(chat.encode(text)) == text and chat.role_id["system"] == rows_in_folder
    # the loss on the assistant tokens, before (the folder's weights) and after ten steps
    result = evaluate_stage_run(run, device="cpu")
    assert result["after"]["assistant_tokens"] == result["before"]["assistant_tokens"] > 50
    assert result["after"]["assistant_loss"] < result["before"]["assistant_loss"] - 0.5
    # exported again, the folder already holds the template's tokens: a further stage reuses their ids
    export_run(run, tmp_path / "exported")
    card = (tmp_path / "exported" / "README.md").read_text()
    assert f"| started from | {llama_folder.resolve()} (LlamaForCausalLM) |" in card and "| pid |" not in card
    cfg = load_experiment(exp, [f"model.init_from={tmp_path / 'exported'}"])
    again = stage_tokenizer(cfg)
    assert again.vocab_size == chat.vocab_size and again.ids == chat.ids and again.encode(text) == chat.encode(text)


def test_dpo_from_a_hugging_face_folder_has_the_folders_model_as_reference(llama_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from micro_arch.experiment import load_experiment
    from micro_arch.hf.init import load_initial_weights
    from micro_arch.stages import stage_of

    cfg = load_experiment(folder_experiment(llama_folder, tmp_path, "dpo", PAIRS, dpo_beta=0.5))
    data = stage_of(cfg).prepare_data(cfg)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    stage = stage_of(cfg).pieces(cfg, data, torch.device("cpu"))
    folder_model = AutoModelForCausalLM.from_pretrained(llama_folder, local_files_only=True).eval()
    rows = folder_model.config.vocab_size
    idx = torch.randint(0, rows, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = stage.reference(idx).logits
        torch.testing.assert_close(ours[..., :rows], folder_model(input_ids=idx).logits, atol=1e-5, rtol=0)
    policy = Model(cfg.model)
    load_initial_weights(policy, cfg.model)
    loss, _ = stage.loss_fn(policy, stage.source.batch(0))
    assert float(loss.detach()) == pytest.approx(math.log(2), rel=1e-5)  # the policy starts as the reference


def test_a_folder_the_stages_cannot_use_is_one_line(llama_folder, tmp_path):
    import shutil

    from helpers import run_cli
    from transformers import GPTNeoXConfig

    from micro_arch.experiment import load_experiment
    from micro_arch.stages import stage_of

    bare = tmp_path / "no-tokenizer"
    shutil.copytree(llama_folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    exp = folder_experiment(bare, tmp_path, "sft", [{"messages": c} for c in DIALOGUE])
    out = run_cli("run", exp, "--runs-dir", tmp_path / "runs")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "no tokenizer files (tokenizer.json, " in out.stderr
    assert "train.stage=sft needs the model's tokenizer: save the model's tokenizer beside its weights" in out.stderr
    assert not (tmp_path / "runs").exists()

    other = tmp_path / "neox"
    shutil.copytree(llama_folder, other, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    GPTNeoXConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64).save_pretrained(other)
    cfg = load_experiment(exp, [f"model.init_from={other}"])
    with pytest.raises(MicroArchError, match="cannot import: model_type 'gpt_neox' has no micro-arch layout; "
                                             "supported: gpt2, llama, mamba, mistral, mixtral, qwen2_moe, qwen3"):
        stage_of(cfg).prepare_data(cfg)


def test_a_model_section_that_does_not_match_the_folder_shows_the_one_that_does(llama_folder, tmp_path):
    from micro_arch.config import from_dict
    from micro_arch.experiment import load_experiment
    from micro_arch.hf.init import load_initial_weights

    cfg = load_experiment(folder_experiment(llama_folder, tmp_path, "sft", []), ["model.d_ff=48"])
    cfg.model.vocab_size = 300
    with pytest.raises(MicroArchError, match="hidden is 64 in the source, 48 here") as err:
        load_initial_weights(Model(cfg.model), cfg.model)
    section = yaml.safe_load(str(err.value).split("the folder's model section: ", 1)[1])
    assert section["d_ff"] == 64 and section["n_kv_heads"] == 1
    pasted = from_dict(ModelConfig, {**section, "vocab_size": 300, "init_from": str(llama_folder)})
    assert load_initial_weights(Model(pasted), pasted)["type"] == "huggingface"
