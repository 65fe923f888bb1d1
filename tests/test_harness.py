"""Downstream tasks through lm-evaluation-harness: the `micro-arch` model against lm-eval's own `hf` model on the
exported folder (the oracle), rolling log-likelihood against the run's held-out loss, generation against
`micro-arch generate`, a custom block, the CORE aggregate, downstream.json, and bad input in one line each."""

import json
import math
import textwrap

import pytest
import torch

from micro_arch.commands.run import run_experiment
from micro_arch.errors import MicroArchError

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = """
model:
  d_model: 32
  n_heads: 2
  n_kv_heads: 1
  max_seq_len: 32
  positions: rope
  layers: [{spec: "Norm->Attn->+->Norm->MLP->+", repeat: 2}]
  tie_embeddings: false
data: {source: shakespeare, tokenizer: char}
train:
  batch_size: 4
  seq_len: 32
  max_steps: 30
  warmup_steps: 2
  lr: 3.0e-3
  eval_every: 30
  eval_batches: 1
  log_every: 10
  checkpoint_every: 30
  sample: {prompts: ["A"], max_new_tokens: 2}
"""

QUESTIONS = [  # (context, choices, answer); contexts longer than the model's 32 tokens are cut on the left
    ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the",
     ["sun", "moon", "king", "night"], 0),
    ("JULIET:\nO Romeo, Romeo, wherefore art thou", ["Romeo", "here", "there"], 0),
    ("HAMLET:\nTo be, or not to", ["be", "see", "go", "sleep"], 0),
    ("", ["First Citizen", "Second Citizen"], 0),  # an empty context: the document boundary stands in
    ("KING:\nMy lord, the", ["queen", "duke", "earl", "fool"], 1),
    ("Now is the winter of our discontent\nMade glorious summer by this sun of", ["York", "Rome", "night", "day"], 0),
]


class Req:
    """What the adapter reads of an lm-eval Instance."""

    def __init__(self, *args):
        self.args = args


def write_mc_task(folder, name="tiny_mc", questions=QUESTIONS):
    """A local multiple-choice task: a YAML with dataset_path: json and a jsonl beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"query": q, "choices": c, "gold": a} for q, c, a in questions]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / f"{name}.jsonl"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{query}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: gold
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    return folder


def train(root, name, text=TINY, blocks=None):
    exp = root / name
    exp.mkdir()
    (exp / "config.yaml").write_text(textwrap.dedent(text))
    if blocks:
        (exp / "blocks.py").write_text(textwrap.dedent(blocks))
    return run_experiment(exp, runs_root=root / "runs")


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("char"), "tiny-llama")


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    from micro_arch.data.corpus import shakespeare_documents

    root = tmp_path_factory.mktemp("bpe")
    train_docs, _ = shakespeare_documents()
    (root / "corpus.txt").write_text("\n\n".join(train_docs)[:300_000])
    text = TINY.replace("data: {source: shakespeare, tokenizer: char}",
                        f"data: {{source: {root / 'corpus.txt'}, tokenizer: bpe, vocab_size: 400}}")
    return train(root, "tiny-llama-bpe", text)


def write_rolling_and_generation_tasks(folder):
    """tiny_roll (perplexity of whole texts, longer than the context) and tiny_gen (greedy until 'e')."""
    texts = [" ".join(q for q, _, _ in QUESTIONS), "JULIET:\nO Romeo, Romeo!", "To be, or not to be"]
    prompts = ["ROMEO:\n", "JULIET:\nO", "KING", "HAMLET:\nTo be"]  # lengths 7, 9, 4, 13
    (folder / "roll.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"q": p, "a": "x"}) + "\n" for p in prompts))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "roll.yaml").write_text("task: tiny_roll\n" + head.format(folder / "roll.jsonl") + textwrap.dedent("""\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]
        """))
    (folder / "gen.yaml").write_text("task: tiny_gen\n" + head.format(folder / "gen.jsonl") + textwrap.dedent("""\
        output_type: generate_until
        doc_to_text: "{{q}}"
        doc_to_target: "{{a}}"
        generation_kwargs: {until: ["e"], max_gen_toks: 12, do_sample: false}
        metric_list: [{metric: exact_match}]
        """))


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory):
    folder = write_mc_task(tmp_path_factory.mktemp("tasks"))
    write_rolling_and_generation_tasks(folder)
    return folder


def local_manager(folder):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False)


def evaluate(model, model_args, task_folder, batch_size, tasks=("tiny_mc",), **kwargs):
    import lm_eval

    import micro_arch.eval.harness  # noqa: F401

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), batch_size=batch_size,
                                   task_manager=local_manager(task_folder), log_samples=True, **kwargs)


@pytest.mark.parametrize("run_name", ["char_run", "bpe_run"])
def test_every_loglikelihood_equals_lm_evals_hf_model_on_the_exported_folder(run_name, mc_task, tmp_path, request):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (in the dev extra)")
    from micro_arch.hf.export import export_run

    run_dir = request.getfixturevalue(run_name)
    folder = tmp_path / "hf"
    export_run(run_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 32 and config["bos_token"] == config["eos_token"] == "\n"
    # no prefix_token_id, no max_length: the folder as it is
    tasks = ("tiny_mc", "tiny_roll", "tiny_gen")
    theirs = evaluate("hf", {"pretrained": str(folder), "device": "cpu"}, mc_task, batch_size=4, tasks=tasks)
    ours = evaluate("micro-arch", {"run": str(run_dir)}, mc_task, batch_size=4, tasks=tasks)
    n_requests = 0
    for a, b in zip(ours["samples"]["tiny_mc"], theirs["samples"]["tiny_mc"], strict=True):
        assert a["arguments"] == b["arguments"]
        for (ll_a, greedy_a), (ll_b, greedy_b) in ((x[0], y[0]) for x, y in zip(a["resps"], b["resps"])):
            assert abs(ll_a - ll_b) <= 1e-4 and greedy_a == greedy_b
            n_requests += 1
    assert n_requests == sum(len(c) for _, c, _ in QUESTIONS)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == theirs["results"]["tiny_mc"][metric]
    for a, b in zip(ours["samples"]["tiny_roll"], theirs["samples"]["tiny_roll"], strict=True):  # whole texts
        assert abs(a["resps"][0][0] - b["resps"][0][0]) <= 1e-4
    for a, b in zip(ours["samples"]["tiny_gen"], theirs["samples"]["tiny_gen"], strict=True):  # greedy text
        assert a["resps"] == b["resps"]


def naive_logprob(model, context: list[int], continuation: list[int], max_length: int) -> float:
    """One token at a time, each from its own forward on the last max_length tokens before it."""
    seq, total = list(context), 0.0
    with torch.no_grad():
        for token in continuation:
            logits = model(torch.tensor([seq[-max_length:]])).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[token])
            seq.append(token)
    return total


def test_batched_scores_equal_a_token_by_token_reference_whatever_the_batch(char_run):
    from micro_arch.eval.scoring import continuation_logprobs
    from micro_arch.rundir import load_run

    _, model, tok = load_run(char_run)
    requests = [(tok.encode(q or "\n"), tok.encode(" " + c)) for q, choices, _ in QUESTIONS for c in choices]
    requests.append((tok.encode("A"), tok.encode("B" * 31)))  # a continuation that fills the context
    one = continuation_logprobs(model, requests, 32, batch_size=1)
    many = continuation_logprobs(model, requests, 32, batch_size=7)
    for (ctx, cont), (a, _), (b, _) in zip(requests, one, many):
        reference = naive_logprob(model, ctx, cont, 32) if len(ctx) + len(cont) <= 33 else None
        assert abs(a - b) < 1e-4
        if reference is not None:  # beyond the context the naive loop would slide, the harness cuts once
            assert abs(a - reference) < 1e-4
    with pytest.raises(MicroArchError, match="longer than the model's context"):
        continuation_logprobs(model, [(tok.encode("A"), tok.encode("B" * 33))], 32, batch_size=1)


def test_rolling_loglikelihood_equals_the_runs_own_held_out_loss_on_the_same_text(char_run):
    from micro_arch.data import prepare_data
    from micro_arch.data.boundary import boundary_token
    from micro_arch.eval.evaluate import evaluate as held_out
    from micro_arch.eval.harness import MicroArchLM

    lm = MicroArchLM(run=str(char_run), batch_size=3)
    cfg = lm.cfg
    val = prepare_data(cfg.data).val
    boundary = boundary_token(lm.text.base)
    start = next(i for i in range(len(val)) if val[i] == boundary)  # a text that follows a document boundary
    n = 5 * 32  # five full windows of the model's context
    tokens = val[start:start + n + 1]
    measured = held_out(lm.model, tokens, 32, 4, "cpu")
    assert measured["n_tokens"] == n
    text = lm.text.decode(tokens[1:].tolist())
    (rolled, twice) = lm.loglikelihood_rolling([Req(text), Req(text)])
    assert rolled == pytest.approx(twice)
    assert -rolled / n == pytest.approx(measured["val_loss"], abs=1e-5)


def test_generate_until_stops_at_stop_strings_and_equals_micro_arch_generate(char_run):
    from micro_arch.eval.generate import sample_texts
    from micro_arch.eval.harness import MicroArchLM

    lm = MicroArchLM(run=str(char_run), batch_size=2)
    prompts = ["ROMEO:", "JULIET:", "KING:", "HAMLET:"]  # 6, 7, 5 and 7 characters: three batches
    greedy = sample_texts(lm.model, lm.text.base, prompts, max_new_tokens=24, temperature=0)
    stops = [[text[3]] if len(text) > 3 else ["zz"] for text in greedy]  # a character it writes on the way
    got = lm.generate_until([Req(p, {"until": s, "max_gen_toks": 24}) for p, s in zip(prompts, stops)])
    for text, stop, out in zip(greedy, stops, got):
        expected = text.split("\n")[0]  # the end-of-text token's text stops it too, as in lm-eval's hf model
        expected = expected.split(stop[0])[0]
        assert out == expected
        assert stop[0] not in out
    calls = []  # generation itself ends at the stop string, not only its text
    hook = lm.model.register_forward_hook(lambda *_: calls.append(1))
    lm.generate_until([Req(prompts[0], {"until": stops[0], "max_gen_toks": 24})])
    hook.remove()
    assert len(calls) == len(got[0]) + 1 < 24  # one forward per new token, the stop string's included


def test_an_experiments_own_block_evaluates(tmp_path, mc_task):
    from micro_arch.eval.downstream import evaluate_tasks, read_evaluations

    blocks = '''
        import torch
        from torch import nn
        from micro_arch.model.registry import register_block

        @register_block("harness_scaled_tanh", kind="other")
        class ScaledTanh(nn.Module):
            def __init__(self, d_model: int, init: float = 1.0):
                super().__init__()
                self.scale = nn.Parameter(torch.full((d_model,), init))

            def forward(self, x, state):
                return torch.tanh(x) * self.scale
        '''
    text = TINY.replace('"Norm->Attn->+->Norm->MLP->+"', '"Norm->Attn->+->Norm->MLP->harness_scaled_tanh(init=0.5)->+"')
    run_dir = train(tmp_path, "custom", text.replace("max_steps: 30", "max_steps: 3"), blocks)
    result = evaluate_tasks(run_dir, ["tiny_mc"], limit=4, batch_size=4, include_path=str(mc_task))
    score = result["scores"]["tiny_mc"]
    assert score["n"] == 4 and 0 <= score["accuracy"] <= 1
    chance = sum(1 / len(c) for _, c, _ in QUESTIONS[:4]) / 4
    assert score["chance"] == pytest.approx(chance)
    assert score["centered"] == pytest.approx((score["accuracy"] - chance) / (1 - chance))
    (saved,) = read_evaluations(run_dir)
    assert saved["tasks"] == ["tiny_mc"] and saved["limit"] == 4 and saved["lm_eval_version"]
    evaluate_tasks(run_dir, ["tiny_mc"], limit=4, batch_size=2, include_path=str(mc_task))  # same setting: replaced
    evaluate_tasks(run_dir, ["tiny_mc"], limit=2, batch_size=2, include_path=str(mc_task))  # another: kept beside
    assert [e["limit"] for e in read_evaluations(run_dir)] == [4, 2]


def test_core_centers_on_chance_and_propagates_standard_errors():
    from micro_arch.eval.core import aggregate, centered, chance_of

    assert chance_of([4, 4, 2]) == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    assert centered(0.25, 0.25) == 0 and centered(1.0, 0.25) == 1 and centered(0.0, 0.0) == 0
    scores = {"a": {"centered": 0.2, "centered_stderr": 0.03}, "b": {"centered": 0.6, "centered_stderr": 0.04},
              "ppl": {"centered": None}}
    core = aggregate(scores)
    assert core["n_tasks"] == 2 and core["tasks"] == ["a", "b"]
    assert core["centered"] == pytest.approx(0.4)
    assert core["stderr"] == pytest.approx(math.sqrt(0.03 ** 2 + 0.04 ** 2) / 2)  # in quadrature, over n


def test_a_chat_runs_template_renders_as_the_exported_tokenizer_does(tmp_path):
    from transformers import AutoTokenizer

    from micro_arch.data.chat_template import SPECIAL_TOKENS, ChatTokenizer, render
    from micro_arch.data.tokenizers import CharTokenizer
    from micro_arch.eval.run_text import RunText
    from micro_arch.hf.tokenizer import hf_tokenizer

    base = CharTokenizer("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ,.?!:\n")
    ChatTokenizer(base).save(tmp_path)
    text = RunText(tmp_path, base)
    messages = [{"role": "system", "content": "VIOLA asks."}, {"role": "user", "content": "What country is this?"}]
    hf_tokenizer(base, list(SPECIAL_TOKENS)).save_pretrained(tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    rendered = text.render(messages, add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids, _ = render(ChatTokenizer(base), messages, add_generation_prompt=True)
    assert text.encode(rendered) == ids.tolist()
    assert text.end_id == ChatTokenizer(base).end_id
    (tmp_path / "chat_template.json").unlink()
    with pytest.raises(MicroArchError, match="no chat template"):
        RunText(tmp_path, base).render(messages)


def test_bad_input_is_one_line_each(char_run, tmp_path, monkeypatch, mc_task):
    import shutil
    import sys

    from micro_arch.eval.downstream import check_request, require_lm_eval
    from tests.helpers import run_cli

    with pytest.raises(MicroArchError, match="--limit 0: must be at least 1"):
        check_request(char_run, ["tiny_mc"], limit=0)
    empty = tmp_path / "no-checkpoints"
    empty.mkdir()
    shutil.copy(char_run / "config.yaml", empty / "config.yaml")
    with pytest.raises(MicroArchError, match="no checkpoint to evaluate"):
        check_request(empty, ["tiny_mc"])
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "lm_eval", None)
        with pytest.raises(MicroArchError, match=r"pip install -e '\.\[eval\]'"):
            require_lm_eval()
    for args, message in ((["--limit", "0"], "--limit: must be at least 1"),
                          ([], "no checkpoint to evaluate")):
        result = run_cli("eval", empty if not args else char_run, "--tasks", "tiny_mc", "--include-path", mc_task,
                         *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    result = run_cli("eval", char_run, "--limit", "3")
    assert result.returncode == 2 and "--limit goes with --tasks" in result.stderr
    from micro_arch.eval.harness import MicroArchLM

    with pytest.raises(MicroArchError, match=r"char tokenizer cannot encode a request's text .*'☃'"):
        MicroArchLM(run=str(char_run)).tok_encode("a snowman ☃")


def test_an_unknown_task_and_a_hub_task_offline_are_one_line_each(monkeypatch, mc_task, tmp_path):
    import datasets
    from huggingface_hub import constants

    from micro_arch.eval.downstream import check_task_names, load_tasks, task_manager

    manager = task_manager(["arc_easy"], str(mc_task))  # lm-eval's own tasks and the local ones, indexed once
    with pytest.raises(MicroArchError, match=r"--tasks tiny_mq: no such lm-eval task .*did you mean: tiny_mc"):
        check_task_names(manager, ["tiny_mq"], str(mc_task))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as with no connection and an empty cache,
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # whatever this machine has
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MicroArchError, match="--tasks arc_easy: its data is on the Hugging Face hub"):
        load_tasks(manager, ["arc_easy"], reason="HF_HUB_OFFLINE is set")


def _evaluation(core, se, tasks=("a",), limit=None):
    return {"tasks": list(tasks), "num_fewshot": None, "limit": limit, "chat_template": False,
            "core": {"centered": core, "stderr": se}, "scores": {}}


def test_a_downstream_winner_is_named_only_beyond_the_noise():
    from micro_arch.report.downstream import verdict

    line, best = verdict("d", {"x": _evaluation(0.50, 0.02), "y": _evaluation(0.30, 0.02)})
    assert best == "x" and "x is best" in line
    line, best = verdict("d", {"x": _evaluation(0.50, 0.10), "y": _evaluation(0.40, 0.10)})
    assert best is None and "within noise between x, y" in line


def test_compare_shows_downstream_scores_only_across_runs_of_one_setting(char_run, bpe_run, mc_task, tmp_path):
    from rich.console import Console

    from micro_arch.eval.downstream import evaluate_tasks
    from micro_arch.report.compare import compare

    for run_dir in (char_run, bpe_run):
        evaluate_tasks(run_dir, ["tiny_mc"], limit=6, batch_size=8, include_path=str(mc_task))
    evaluate_tasks(char_run, ["tiny_mc"], limit=3, batch_size=8, include_path=str(mc_task))  # this run only
    folder = compare([char_run, bpe_run], tmp_path / "report", console=Console(file=open(tmp_path / "log", "w")),
                     max_batches=1)
    text = (folder / "report.md").read_text()
    assert "downstream [1] CORE (centered)" in text and "downstream [1] tiny_mc accuracy" in text
    assert "downstream [2]" not in text  # the limit=3 setting has one run: nothing to compare it with
    assert "first 6 documents" in text and "downstream [1]: " in text  # the setting, and its verdict line


def test_the_shipped_shakespeare_task_runs_offline_from_the_repository_root(tmp_path, monkeypatch):
    from micro_arch.eval.downstream import evaluate_tasks
    from tests.helpers import ROOT

    text = TINY.replace("max_seq_len: 32", "max_seq_len: 64").replace("seq_len: 32", "seq_len: 64")
    char_run = train(tmp_path, "context-64", text.replace("max_steps: 30", "max_steps: 2"))  # the default's context

    monkeypatch.chdir(ROOT)  # its data_files path is relative to the repository's root, as the README runs it
    result = evaluate_tasks(char_run, ["shakespeare_mc"], num_fewshot=1, limit=6, batch_size=8,
                            include_path="tasks/shakespeare-mc")
    score = result["scores"]["shakespeare_mc"]
    assert score["n"] == 6 and score["shots"] == 1 and score["chance"] == pytest.approx(0.25)


def test_an_sft_run_gets_its_chat_template_only_when_asked(tmp_path, mc_task):
    from micro_arch.data.chat_template import ChatTokenizer, load_chat_tokenizer, render
    from micro_arch.data.corpus import read_works
    from micro_arch.eval.scoring import continuation_logprobs
    from micro_arch.rundir import load_run
    from micro_arch.stages.dialogues import exchanges

    rows = [{"messages": e.messages()} for e in exchanges(read_works()[3:4], max_user_chars=60,
                                                          max_answer_chars=50)[:40]]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pretrain = train(tmp_path, "pretrain", TINY.replace("max_steps: 30", "max_steps: 2"))
    sft = textwrap.dedent(f"""
        extends: ../pretrain/config.yaml
        model: {{max_seq_len: 96, init_from: {pretrain}}}
        data: {{source: {tmp_path / "sft.jsonl"}, val_source: {tmp_path / "sft.jsonl"}}}
        train: {{stage: sft, seq_len: 96, batch_size: 4, max_steps: 2, warmup_steps: 1, eval_every: 2,
                eval_batches: 1, log_every: 1, checkpoint_every: 2}}
        """)
    run_dir = train(tmp_path, "sft", sft)
    plain = evaluate("micro-arch", {"run": str(run_dir)}, mc_task, batch_size=8, limit=3)
    chat = evaluate("micro-arch", {"run": str(run_dir)}, mc_task, batch_size=8, limit=3, apply_chat_template=True)
    _, model, base = load_run(run_dir)
    tok = load_chat_tokenizer(run_dir)
    for sample in plain["samples"]["tiny_mc"]:
        assert "<|" not in sample["arguments"][0][0]
    for sample in chat["samples"]["tiny_mc"]:
        context = sample["arguments"][0][0]
        assert context.startswith("<|user|>") and context.endswith("<|assistant|>")
        question = QUESTIONS[sample["doc_id"]][0]
        ids, _ = render(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
        for (_, choice), resp in zip(sample["arguments"], sample["resps"]):
            (expected, _), = continuation_logprobs(model, [(ids.tolist(), base.encode(choice))], 96, 1)
            assert abs(resp[0][0] - expected) < 1e-4
    assert isinstance(tok, ChatTokenizer)


@pytest.mark.parametrize("experiment", ["hybrid-mamba", "moe", "parallel-gptj", "sliding-window"])
def test_every_shipped_family_scores_alike_in_any_batch_and_generates(experiment):
    """Right padding leaves every causal model's scores unchanged (Mamba's scan and conv, MoE routing, windows);
    generation with each family's cache runs and stops."""
    from micro_arch.data import CharTokenizer
    from micro_arch.eval.harness import MicroArchLM
    from micro_arch.eval.scoring import continuation_logprobs
    from micro_arch.experiment import load_experiment
    from micro_arch.model.model import Model
    from tests.helpers import ROOT

    tok = CharTokenizer("".join(sorted({c for q, cs, _ in QUESTIONS for c in q + "".join(cs) + " \n"})))
    cfg = load_experiment(str(ROOT / "experiments" / experiment), ["model.d_model=32", "model.max_seq_len=48",
                                                                       "train.seq_len=48"])
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = Model(cfg.model).eval()
    requests = [(tok.encode(q or "\n"), tok.encode(" " + c)) for q, choices, _ in QUESTIONS for c in choices]
    one = continuation_logprobs(model, requests, 48, batch_size=1)
    many = continuation_logprobs(model, requests, 48, batch_size=8)
    assert max(abs(a[0] - b[0]) for a, b in zip(one, many)) < 1e-4
    lm = MicroArchLM.for_model(cfg, model, tok, batch_size=2)
    out = lm.generate_until([Req("ROMEO:", {"until": ["zz"], "max_gen_toks": 6}), Req("KING:", {"max_gen_toks": 6})])
    assert all(isinstance(t, str) and len(t) <= 6 for t in out)


def test_eval_with_tasks_on_several_runs_prints_one_table(char_run, bpe_run, mc_task):
    from tests.helpers import run_cli

    result = run_cli("eval", char_run, bpe_run, char_run, "--tasks", "tiny_mc,tiny_roll", "--include-path", mc_task,
                     "--limit", "2", "--batch-size", "4", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("CORE (mean centered)") == 1  # one table; the run given twice is evaluated once
    assert char_run.name in result.stdout and bpe_run.name in result.stdout and "bits/byte" in result.stdout
    for run_dir in (char_run, bpe_run):
        (evaluation,) = [e for e in json.loads((run_dir / "downstream.json").read_text())["evaluations"]
                         if e["tasks"] == ["tiny_mc", "tiny_roll"]]
        assert evaluation["limit"] == 2 and evaluation["scores"]["tiny_mc"]["n"] == 2
