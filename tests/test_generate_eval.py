"""Generation (cache against recompute, batching, filtering) and held-out evaluation (against hand computations)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from micro_arch.config import LayerGroup, ModelConfig
from micro_arch.eval.generate import filter_top_k, filter_top_p, generate, generate_from_prompts, sample_texts
from micro_arch.model.model import Model
from micro_arch.model.registry import list_blocks

VOCAB = 50


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def tiny_model(spec="Norm->Attn->+->Norm->MLP->+", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"d_model": 32, "n_heads": 4, "vocab_size": VOCAB, "max_seq_len": 24,
                         "layers": [LayerGroup(spec, 2)], "tie_embeddings": False, **overrides})
    model = Model(cfg).eval()
    with torch.no_grad():  # larger weights than the init's, so that greedy choices depend on the context
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5)
    return model


def prompt(batch=2, length=5, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class CharTokenizer:
    name = "char"

    def __init__(self, text):
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)

    def encode(self, s):
        return [self.chars.index(c) for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


MODELS = {
    "rope": {},
    "learned": {"positions": "learned"},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "sliding_window": {"spec": "Norm->Attn(window=4)->+->Norm->MLP->+"},
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("length,new", [(5, 12), (1, 5), (10, 20), (30, 3)])  # the last two outgrow max_seq_len
def test_greedy_with_cache_equals_recompute(name, length, new):
    model = tiny_model(**MODELS[name])
    idx = prompt(length=length)
    cached = generate(model, idx, new, temperature=0, use_cache=True)
    recomputed = generate(model, idx, new, temperature=0, use_cache=False)
    assert cached.shape == (2, length + new)
    assert torch.equal(cached[:, :length], idx)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[:, length:].flatten().tolist())) > 1  # not a degenerate model repeating one token


def test_mamba_cache_equals_recompute():
    if not list_blocks("mamba"):
        pytest.skip("no 'mamba' block registered (blocks/mamba.py absent)")
    model = tiny_model("Norm->Mamba(chunk_size=4)->+")  # a prefill of several chunks
    idx = prompt(length=6)
    assert torch.equal(generate(model, idx, 10, temperature=0, use_cache=True),
                       generate(model, idx, 10, temperature=0, use_cache=False))


def test_sampling_with_cache_equals_recompute_for_the_same_seed():
    model = tiny_model()
    idx = prompt(length=4)
    runs = [generate(model, idx, 10, temperature=1.0, top_k=10, use_cache=use_cache,
                     generator=torch.Generator().manual_seed(3)) for use_cache in (True, False)]
    assert torch.equal(*runs)


def test_batched_prompts_of_different_lengths_equal_one_by_one():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8], [9], [10, 11]]
    together = generate_from_prompts(model, prompts, 8, num_samples=2, temperature=0)
    assert len(together) == 2 * len(prompts)
    for i, ids in enumerate(prompts):
        alone = generate(model, torch.tensor([ids]), 8, temperature=0)[0, len(ids):].tolist()
        assert together[2 * i] == alone and together[2 * i + 1] == alone


def test_top_k_one_is_greedy():
    model = tiny_model()
    idx = prompt(length=3)
    sampled = generate(model, idx, 10, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(model, idx, 10, temperature=0))


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    kept = lambda p: set(torch.isfinite(filter_top_p(logits, p))[0].nonzero().flatten().tolist())
    assert kept(0.3) == {1}  # the most likely token alone already reaches 0.3
    assert kept(0.75) == {1, 3}
    assert kept(0.85) == {1, 3, 2}
    assert kept(0.99) == {0, 1, 2, 3}
    assert set(torch.isfinite(filter_top_k(logits, 2))[0].nonzero().flatten().tolist()) == {1, 3}


def test_top_p_sampling_never_leaves_the_nucleus():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().repeat(2000, 1)
    from micro_arch.eval.generate import next_token

    drawn = next_token(logits, 1.0, None, 0.75, torch.Generator().manual_seed(0))
    assert set(drawn.flatten().tolist()) == {1, 3}


def test_sample_texts_returns_continuations_prompt_major():
    tok = CharTokenizer("abcdefgh \n")
    model = tiny_model(vocab_size=tok.vocab_size + 5)  # ids beyond the tokenizer's are never sampled
    prompts = ["abc", "", "hg"]
    texts = sample_texts(model, tok, prompts, max_new_tokens=6, temperature=1.0, top_k=None, seed=2, num_samples=2)
    assert len(texts) == 6 and all(len(t) == 6 for t in texts)
    assert texts == sample_texts(model, tok, prompts, max_new_tokens=6, temperature=1.0, top_k=None, seed=2,
                                 num_samples=2)
    greedy = sample_texts(model, tok, prompts, max_new_tokens=6, temperature=0, num_samples=2)
    for i, p in enumerate(prompts):
        ids = tok.encode(p or "\n")
        alone = generate(model, torch.tensor([ids]), 6, temperature=0, vocab_limit=tok.vocab_size)
        assert greedy[2 * i] == greedy[2 * i + 1] == tok.decode(alone[0, len(ids):].tolist())


# --- evaluation --------------------------------------------------------------------------------


def require_data_package():
    data = pytest.importorskip("micro_arch.data", reason="the data package is not written yet")
    if not all(hasattr(data, name) for name in ("iter_eval_windows", "prepare_data", "load_tokenizer")):
        pytest.skip("the data package is not complete yet")


def hand_windows(tokens, seq_len):
    """Non-overlapping windows over the whole split; the last, short one padded with targets -1."""
    xs, ys = [], []
    for start in range(0, len(tokens) - 1, seq_len):
        x = tokens[start:start + seq_len]
        y = tokens[start + 1:start + seq_len + 1]
        x = torch.cat([x, x.new_zeros(seq_len - len(x))])
        y = torch.cat([y, y.new_full((seq_len - len(y),), -1)])
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def test_evaluate_matches_hand_computation():
    require_data_package()
    from micro_arch.eval.evaluate import evaluate

    text = "First Citizen: Before we proceed any further, hear me speak. Ünïcödé ✓\n" * 3
    tok = CharTokenizer(text)
    tokens = torch.tensor(tok.encode(text))
    model = tiny_model(vocab_size=tok.vocab_size)  # overrides VOCAB
    seq_len = 16
    result = evaluate(model, tokens.numpy(), seq_len, batch_size=4, device="cpu", tokenizer=tok)

    x, y = hand_windows(tokens, seq_len)
    with torch.no_grad():
        logits = model(x).logits
    valid = y != -1
    nats = F.cross_entropy(logits.reshape(-1, tok.vocab_size), y.reshape(-1), ignore_index=-1, reduction="sum")
    n = int(valid.sum())
    assert n == len(tokens) - 1 == result["n_tokens"]
    assert result["val_loss"] == pytest.approx(float(nats) / n, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(float(nats) / n), rel=1e-5)
    top5 = logits.topk(5, -1).indices
    assert result["top1"] == pytest.approx(float(((logits.argmax(-1) == y) & valid).sum()) / n)
    assert result["top5"] == pytest.approx(float(((top5 == y[..., None]).any(-1) & valid).sum()) / n)
    n_bytes = len(text[1:].encode("utf-8"))  # every character but the first is predicted
    assert result["bits_per_byte"] == pytest.approx(float(nats) / (math.log(2) * n_bytes), rel=1e-5)
    assert len(result["batch_losses"]) == math.ceil(len(x) / 4)

    limited = evaluate(model, tokens.numpy(), seq_len, batch_size=2, device="cpu", max_batches=1)
    assert limited["n_tokens"] == 2 * seq_len and len(limited["batch_losses"]) == 1


@pytest.mark.slow
def test_run_then_generate_and_eval_from_the_command_line(tmp_path):
    require_data_package()
    from helpers import run_cli

    result = run_cli("run", "experiments/shakespeare-char", "--runs-dir", tmp_path, "--set",
                     "train.max_steps=4", "train.eval_every=2", "train.log_every=2", "train.eval_batches=2",
                     "train.batch_size=4", "train.seq_len=32", "model.d_model=32", "model.n_heads=2",
                     "train.sample.max_new_tokens=10", "train.device=cpu")
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "shakespeare-char").iterdir()
    assert json.loads((run_dir / "samples.json").read_text())[0]["text"]

    gen = run_cli("generate", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "20", "--device", "cpu")
    assert gen.returncode == 0, gen.stderr
    assert "ROMEO:" in gen.stdout and "tokens/s" in gen.stdout

    ev = run_cli("eval", run_dir, "--max-batches", "3", "--device", "cpu")
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads((run_dir / "eval.json").read_text())
    for key in ("val_loss", "perplexity", "bits_per_byte", "top1", "top5", "n_tokens", "batch_losses",
                "data_fingerprint"):
        assert key in metrics
    assert len(metrics["batch_losses"]) == 3 and metrics["bits_per_byte"] > 0

    above = run_cli("generate", run_dir.parent, "--prompt", "ROMEO:")  # the experiment's folder, not a run's
    assert above.returncode == 2 and f"pass one of them, e.g. {run_dir}" in above.stderr, above.stderr
