"""GRPO's pieces against cases computed by hand."""

import math

import pytest
import torch

from harness.recipes.rl_math import (
    clipped_surrogate,
    completion_logprobs,
    group_advantages,
    k3_kl,
    masked_mean,
    mismatch_metrics,
    tis_weights,
)
from harness.rollout.hf import completion_mask


def test_group_advantages_by_hand():
    # group 1: rewards 1,0,0,0 -> mean 0.25, unbiased std sqrt((0.5625 + 3*0.0625)/3) = 0.5
    # group 2: all equal -> no signal, zero advantage, flagged
    adv, zero_std = group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), group_size=4, eps=1e-4)
    assert adv[:4].tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    assert adv[4:].tolist() == [0.0] * 4
    assert zero_std.tolist() == [False, True]


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)])
    # d = log(0.25/0.5) = -log 2: exp(d) - d - 1 = 0.5 + log 2 - 1
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0], abs=1e-7)
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


@pytest.mark.parametrize(
    "ratio, adv, low, high, loss, clipped",
    [
        (1.5, 1.0, 0.2, 0.2, -1.2, True),  # good token pushed too far up: the clip bound holds it
        (1.5, 1.0, 0.2, 0.28, -1.28, True),  # asymmetric upper bound (DAPO's clip-higher)
        (0.5, 1.0, 0.2, 0.2, -0.5, False),  # below the bound with A>0: unclipped, still pushed up
        (0.5, -1.0, 0.2, 0.2, 0.8, True),  # bad token already pushed down enough: clipped
        (1.5, -1.0, 0.2, 0.2, 1.5, False),  # bad token made likelier: full penalty, no clipping
        (1.0, 2.0, 0.2, 0.2, -2.0, False),  # on-policy: ratio 1, loss = -A
    ],
)
def test_clipped_surrogate_by_hand(ratio, adv, low, high, loss, clipped):
    old = torch.tensor([[math.log(0.4)]])
    new = old + math.log(ratio)
    out, is_clipped = clipped_surrogate(new, old, torch.tensor([adv]), low, high)
    assert out.item() == pytest.approx(loss, rel=1e-5)
    assert is_clipped.item() is clipped


def test_clipped_tokens_get_no_gradient():
    old = torch.log(torch.tensor([[0.4, 0.4]]))
    new = (old + torch.log(torch.tensor([[1.5, 1.1]]))).requires_grad_()
    loss, _ = clipped_surrogate(new, old, torch.tensor([1.0]), 0.2, 0.2)
    loss.sum().backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == pytest.approx(-1.1)


def test_masked_mean_ignores_masked_positions():
    x = torch.tensor([[1.0, 2, 3], [4, 5, 6]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = masked_mean(x, mask)
    assert out.item() == pytest.approx(7 / 3)
    out.backward()
    assert x.grad.flatten().tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3, 0, 0])


def test_completion_mask_keeps_first_eos_and_drops_padding():
    eos, pad = 1, 0
    ids = torch.tensor([[5, eos, pad, pad], [5, 6, 7, 8], [eos, pad, pad, pad], [5, eos, 7, eos]])
    assert completion_mask(ids, eos).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]


@pytest.fixture(scope="module")
def random_qwen():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).eval()


def test_logprobs_align_with_the_next_token_and_ignore_left_padding(random_qwen):
    prompt, completion = [7, 8, 9], [10, 11, 12]
    # by hand: logits at position t score token t+1; the completion starts after the prompt's last token
    full = torch.tensor([prompt + completion])
    logits = random_qwen(full).logits[0].float()
    expected = [torch.log_softmax(logits[len(prompt) - 1 + i], -1)[tok].item() for i, tok in enumerate(completion)]

    # the same sequence left-padded by two, beside a longer prompt, with padding after eos
    prompt_ids = torch.tensor([[0, 0] + prompt, [3, 4, 5, 6, 7]])
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    completion_ids = torch.tensor([completion + [0], [10, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with torch.no_grad():
        logp, entropy = completion_logprobs(random_qwen, prompt_ids, prompt_mask, completion_ids, mask)
    assert logp[0, :3].tolist() == pytest.approx(expected, abs=1e-4)
    assert logp.shape == entropy.shape == (2, 4)
    assert (entropy[mask.bool()] > 0).all() and (entropy <= math.log(32) + 1e-4).all()


def test_temperature_scales_the_trained_distribution(random_qwen):
    ids, mask = torch.tensor([[7, 8]]), torch.ones(1, 2, dtype=torch.long)
    comp = torch.tensor([[9]])
    with torch.no_grad():
        hot, _ = completion_logprobs(random_qwen, ids, mask, comp, torch.ones(1, 1, dtype=torch.long), temperature=2.0)
        logits = random_qwen(torch.tensor([[7, 8, 9]])).logits[0, 1].float()
    assert hot.item() == pytest.approx(torch.log_softmax(logits / 2, -1)[9].item(), abs=1e-5)


def test_entropy_by_hand_and_in_pieces(monkeypatch):
    import harness.recipes.rl_math as rl_math

    uniform = torch.zeros(2, 3, 8)  # every position uniform over 8 ids: entropy ln 8
    sure = torch.full((1, 1, 8), -30.0)
    sure[0, 0, 5] = 30.0  # all the mass on one id: entropy ~0
    _, h = rl_math.token_logprobs_and_entropy(uniform, torch.zeros(2, 3, dtype=torch.long))
    assert h.shape == (2, 3) and torch.allclose(h, torch.full((2, 3), math.log(8)))
    assert rl_math.token_logprobs_and_entropy(sure, torch.zeros(1, 1, dtype=torch.long))[1].item() == pytest.approx(0, abs=1e-20)
    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0))
    whole = rl_math.entropy(torch.log_softmax(logits, -1))
    monkeypatch.setattr(rl_math, "SCORE_ROWS", 4)  # 15 positions in pieces of 4, the last one short
    assert torch.allclose(rl_math.entropy(torch.log_softmax(logits, -1)), whole, rtol=0, atol=1e-6)


def test_scoring_keeps_one_vocabulary_sized_tensor_for_the_backward():
    """What autograd keeps between the forward and the backward: log_softmax's output, one float32 [N, C, V] copy.
    The entropy is a metric (no loss has it), so it keeps nothing; with a gradient it kept exp(log p) too, and at a
    152k vocabulary each copy is 9.3 GiB for 16 completions of 1024 tokens (the train phase's peak, issue 23)."""
    from harness.recipes.rl_math import token_logprobs_and_entropy

    logits = torch.randn(2, 3, 32, requires_grad=True)
    kept = {}  # storage -> a tensor saved on it

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, entropy = token_logprobs_and_entropy(logits * 1.0, torch.zeros(2, 3, dtype=torch.long))
    assert sum(t.numel() == logits.numel() for t in kept.values()) == 1
    assert not entropy.requires_grad and logp.requires_grad
    logp.sum().backward()
    assert torch.allclose(logits.grad.sum(-1), torch.zeros(2, 3), atol=1e-6)  # d log p_k / d logits sums to 0


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are a given leaf tensor (the gradient lands on it)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, logits_to_keep, **_):
        return type("Out", (), {"logits": self.logits})


def whole_scores(logits, tokens, temperature, truncation):
    """What completion_logprobs computed before issue 23: autograd on the whole float32 [N, C, V] tensor."""
    from harness.recipes.rl_math import truncated_logprobs

    scaled = logits[:, :-1].float() / temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return (logp, entropy) if truncation is None else (logp, entropy, truncated_logprobs(scaled, tokens, *truncation))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature, truncation", [(1.0, (0, 0.9)), (0.7, (5, 1.0)), (0.7, (5, 0.8)), (1.0, None)])
@pytest.mark.parametrize("rows", [3, 14, 64])  # pieces of part of a sequence, of 2 sequences, of all 5
def test_scores_in_pieces_are_the_whole_tensor_scores_bit_for_bit(monkeypatch, dtype, temperature, truncation, rows):
    import harness.recipes.rl_math as rl_math

    monkeypatch.setattr(rl_math, "SCORE_ROWS", rows)
    gen = torch.Generator().manual_seed(0)
    n, c, v = 5, 7, 50
    start = (3 * torch.randn(n, c + 1, v, generator=gen)).to(dtype)
    tokens = torch.randint(0, v, (n, c), generator=gen)
    ids, weights = torch.zeros(n, 2, dtype=torch.long), torch.randn(n, c, generator=gen)
    results = []
    for score in ("pieces", "whole"):
        leaf = start.clone().requires_grad_()
        if score == "pieces":
            scores = rl_math.completion_logprobs(
                FixedLogits(leaf), ids, torch.ones_like(ids), tokens, torch.ones_like(tokens), temperature, truncation)
        else:
            scores = whole_scores(leaf, tokens, temperature, truncation)
        assert len(scores) == (2 if truncation is None else 3)
        (scores[0] * weights).sum().backward()
        results.append((scores[0].detach(), *scores[1:], leaf.grad))
    for got, expected in zip(*results):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    grad = results[0][-1]
    assert grad[:, -1].abs().sum() == 0 and grad.abs().sum() > 0  # the last position scores no token
    assert not any(x.requires_grad for x in results[0][1:-1])


def test_scores_without_the_entropy_are_the_same_scores_and_compute_none(monkeypatch):
    """with_entropy=False (the reference's pass): None for the entropy, no rl_math.entropy call, and the log-probs,
    truncated log-probs and gradients of the pass with it, bit for bit."""
    import harness.recipes.rl_math as rl_math

    calls = []
    original = rl_math.entropy
    monkeypatch.setattr(rl_math, "entropy", lambda x: calls.append(1) or original(x))
    gen = torch.Generator().manual_seed(1)
    start, tokens = 3 * torch.randn(4, 6, 40, generator=gen), torch.randint(0, 40, (4, 5), generator=gen)
    ids = torch.zeros(4, 2, dtype=torch.long)
    results = []
    for with_entropy in (True, False):
        leaf = start.clone().requires_grad_()
        logp, entropy, truncated = rl_math.completion_logprobs(
            FixedLogits(leaf), ids, torch.ones_like(ids), tokens, torch.ones_like(tokens), 0.7, (5, 0.9), with_entropy)
        logp.sum().backward()
        results.append((logp.detach(), truncated, leaf.grad))
        assert (entropy is None) == (not with_entropy) and bool(calls) == with_entropy
        calls.clear()
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


def test_scoring_refuses_logits_of_other_positions():
    """A model that ignores logits_to_keep and returns every position would have its first C positions scored."""
    from harness.recipes.rl_math import completion_logprobs

    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="logits for 5 positions, not the last 3"):
        completion_logprobs(FixedLogits(torch.zeros(1, 5, 8)), ids, torch.ones_like(ids), ids[:, :2], torch.ones(1, 2))


def test_scoring_keeps_only_the_models_logits_for_the_backward():
    """completion_logprobs keeps the model's own logits (bf16 on a GPU: half a float32 copy) and the tokens, no
    float32 [N, C, V] tensor: autograd on the whole kept log_softmax's output, 9.3 GiB at 16 x 1024 tokens x 152k."""
    from harness.recipes.rl_math import completion_logprobs

    logits = torch.randn(2, 4, 32, dtype=torch.bfloat16, requires_grad=True)
    tokens, ids = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = completion_logprobs(FixedLogits(logits * 1), ids, torch.ones_like(ids), tokens, torch.ones_like(tokens))
    assert [(t.dtype, tuple(t.shape)) for t in kept] == [(torch.bfloat16, (2, 4, 32)), (torch.long, (2, 3))]
    logp.sum().backward()
    assert logits.grad is not None and logits.grad[:, -1].abs().sum() == 0


def test_a_temperature_leaves_the_model_output_as_it_was():
    """completion_logits divides its own float32 copy in place; when the model's logits are float32 already there is
    no copy, and they are divided out of place."""
    from harness.recipes.rl_math import completion_logits

    for dtype in (torch.float32, torch.bfloat16):
        out, ids = torch.ones(1, 3, 4, dtype=dtype), torch.ones(1, 2, dtype=torch.long)
        scaled = completion_logits(FixedLogits(out), ids, torch.ones_like(ids), ids, torch.ones_like(ids), temperature=2.0)
        assert scaled.dtype == torch.float32 and torch.equal(scaled, torch.full((1, 2, 4), 0.5))
        assert torch.equal(out, torch.ones_like(out))


def test_mismatch_metrics():
    mask = torch.tensor([[1, 1, 0]])
    same = mismatch_metrics(torch.tensor([[-1.0, -2, -3]]), torch.tensor([[-1.0, -2, 9]]), mask, cap=2.0)
    assert same == {"mismatch/logprob_diff_mean": 0.0, "mismatch/k3_kl": 0.0, "mismatch/is_ratio_mean": 1.0,
                    "mismatch/ratio_out_of_cap_frac": 0.0}
    off = mismatch_metrics(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]]), torch.tensor([[1]]), cap=2.0)
    assert off["mismatch/is_ratio_mean"] == pytest.approx(2.0)
    assert off["mismatch/logprob_diff_mean"] == pytest.approx(math.log(2))
    assert off["mismatch/k3_kl"] == pytest.approx(2 - 1 - math.log(2))
    assert off["mismatch/ratio_out_of_cap_frac"] == 0.0  # exactly at the cap is inside


def test_ratio_out_of_cap_counts_both_sides_and_only_masked_tokens():
    # ratios 3 (above 2), 1/3 (below 1/2), 1.5 (inside), and a padded 10 that must not count
    train = torch.log(torch.tensor([[0.6, 0.1, 0.3, 1.0]]))
    sampler = torch.log(torch.tensor([[0.2, 0.3, 0.2, 0.1]]))
    m = mismatch_metrics(train, sampler, torch.tensor([[1, 1, 1, 0]]), cap=2.0)
    assert m["mismatch/ratio_out_of_cap_frac"] == pytest.approx(2 / 3)
    assert m["mismatch/is_ratio_mean"] == pytest.approx((3 + 1 / 3 + 1.5) / 3)


def test_tis_weights_truncate_at_the_cap_and_carry_no_gradient():
    train = torch.log(torch.tensor([0.6, 0.1, 0.3])).requires_grad_(True)
    sampler = torch.log(torch.tensor([0.2, 0.3, 0.2]))
    w = tis_weights(train, sampler, cap=2.0)
    assert w.tolist() == pytest.approx([2.0, 1 / 3, 1.5])  # 3 is cut to 2; below-1 ratios are kept
    assert not w.requires_grad
