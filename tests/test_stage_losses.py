"""The losses of the later stages: SFT on assistant tokens only, DPO against a reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from stage_helpers import CONVERSATION, tiny_model

from micro_arch.data.chat_template import (
    inputs_and_targets,
    render,
)
from micro_arch.stages.losses import dpo_objective, sequence_logprobs, sft_loss
from micro_arch.stages.sft_data import ConversationBatches, encode_conversations


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
