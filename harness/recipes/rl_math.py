"""The pieces every recipe shares: log-probs, advantages, KL, clipping, masking, loss aggregation,
and the per-algorithm objectives (DPO's, SFT's) as functions of log-probs.

Each is checked against hand-computed cases in tests/test_rl_math.py.
"""

from __future__ import annotations

import torch

from harness.common.numbers import INF_STANDIN


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where mask is 1 (prompt and padding positions carry 0)."""
    # where, not x * mask: a -inf or NaN at a masked position (a pad outside top-p) must not reach the mean
    return torch.where(mask.bool(), x, 0.0).sum() / mask.to(x.dtype).sum().clamp(min=1)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[G] bool: the groups whose rewards are all equal (no learning signal; frac_reward_zero_std)."""
    return rewards.view(-1, group_size).float().std(1) == 0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """r - mean_group for consecutive groups of `group_size` completions, divided by the group's std
    (scale "group", GRPO), the whole batch's std ("batch") or nothing ("none", Dr. GRPO).

    std is the unbiased sample std (as in TRL). A group whose rewards are all equal gets zero
    advantage: it carries no learning signal, and the second return value flags those groups.
    """
    r = rewards.view(-1, group_size).float()
    mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True)
    centred = r - mean
    if scale == "group":
        centred = centred / (std + eps)
    elif scale == "batch":
        centred = centred / (r.std() + eps)
    return centred.view(-1), zero_std_groups(rewards, group_size)


def loo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i minus the mean of the other completions of its group, (G r_i - sum_group) / (G - 1)."""
    r = rewards.view(-1, group_size).float()
    return ((group_size * r - r.sum(1, keepdim=True)) / (group_size - 1)).view(-1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_tokens: int,
              batch_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A per-token loss [N, C] to a scalar, as TRL's `loss_type` names the choices:
    dapo: mean over every completion token of the batch (long completions weigh more);
    grpo: mean over each sequence's tokens, then over sequences (the paper's; long ones weigh less);
    dr_grpo: sum over tokens / (sequences x max_tokens) (Dr. GRPO: no length normalisation).
    Sequences with no unmasked token (a dropped group) do not count as sequences.

    With `batch_mask` (the whole batch's mask), per_token and mask are rows of that batch (a micro-batch), and the
    batch-wide counts divide: the micro-batches' values then add up to the whole batch's loss."""
    mask = mask.to(per_token.dtype)
    whole = mask if batch_mask is None else batch_mask.to(per_token.dtype)
    total = (per_token * mask).sum(1)
    n_seq = (whole.sum(1) > 0).sum().clamp(min=1)
    if loss_type == "dapo":
        return total.sum() / whole.sum().clamp(min=1)
    if loss_type == "grpo":
        return (total / mask.sum(1).clamp(min=1)).sum() / n_seq
    if loss_type == "dr_grpo":
        return total.sum() / (n_seq * max_tokens)
    raise ValueError(f"loss_type {loss_type!r}: valid: dapo, grpo, dr_grpo")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || ref) from tokens sampled from the policy:
    exp(ref - logp) - (ref - logp) - 1. Unbiased, always >= 0, and 0 where the two agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp, old_logp, advantages, clip_low: float, clip_high: float):
    """PPO's token-level clipped objective, as a loss: -min(rho*A, clip(rho, 1-low, 1+high)*A).

    Returns (per-token loss, per-token bool: the clip bound was the active one).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    is_clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    return -torch.minimum(unclipped, clipped), is_clipped


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the attention mask, as `generate` gives them: left padding does not count."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def model_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """The model's logits at the completion's positions and one before, [N, C + 1, V], in its own dtype.

    The logits at position t predict token t+1, so the completion's C tokens are scored by the
    logits at positions P-1 .. P+C-2 (the first C of these). Positions follow the attention mask, as in
    `generate`, so left-padded prompts get the positions they were sampled with.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = mask_positions(attention)
    return model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                 logits_to_keep=completion_ids.shape[1] + 1).logits


def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0):
    """Logits that score each completion token, [N, C, V], float32, divided by the temperature (the trained policy
    is then the one sampled from). Whole: distill's reverse KL needs every position's distribution at once."""
    return _scaled(model_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)[:, :-1], temperature)


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
                        truncation: tuple[int, float] | None = None, with_entropy: bool = True):
    """(log-prob of each completion token, entropy of each position's distribution), both [N, C]; with `truncation`
    (top_k, top_p) a third, the same forward's truncated_logprobs (no gradient). Computed a few positions at a time
    from the model's own logits (TokenScores): no float32 [N, C, V] copy is ever whole. `with_entropy=False` gives
    None for the entropy: a pass that only scores tokens (the reference's) skips an exp, a product and a sum over
    the vocabulary, which doubled the scoring's time on a CPU at a 152k vocabulary."""
    logits = model_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    if logits.shape[1] != completion_ids.shape[1] + 1:  # else the first C positions would be scored, silently
        raise ValueError(f"the model returned logits for {logits.shape[1]} positions, not the last "
                         f"{completion_ids.shape[1] + 1} asked for with logits_to_keep")
    logp, entropy, truncated = TokenScores.apply(logits, completion_ids, temperature, truncation, with_entropy)
    entropy = entropy if with_entropy else None
    return (logp, entropy) if truncation is None else (logp, entropy, truncated)


SCORE_ROWS = 256  # positions per piece: 256 x 152k float32 is 0.15 GB


def pieces(n: int, c: int):
    """(sequence slice, position slice) covering [n, c] in pieces of about SCORE_ROWS positions."""
    if c >= SCORE_ROWS:
        for i in range(n):
            for j in range(0, c, SCORE_ROWS):
                yield slice(i, i + 1), slice(j, min(c, j + SCORE_ROWS))
    else:
        step = SCORE_ROWS // max(c, 1)
        for i in range(0, n, step):
            yield slice(i, min(n, i + step)), slice(0, c)


class TokenScores(torch.autograd.Function):
    """log_softmax(logits / temperature) at each completion token, from the model's [N, C + 1, V] logits, the same
    operations as on the whole float32 tensor (log-probs, gradients and truncated log-probs the same bit for bit on a
    CPU, tests/test_rl_math.py; the entropy to 1 ulp, where torch splits a one-row sum across threads) but a piece
    at a time. Autograd on the whole kept log_softmax's [N, C, V] float32 output for the backward and made two
    more in it (the gradients into and out of log_softmax): 9.3 GiB each for 16 completions of 1024 tokens at a 152k
    vocabulary, the train phase's largest term (issue 23). This keeps the model's logits (half such a copy in bf16)
    and recomputes each piece's log_softmax in the backward. The entropy and the truncated log-probs come from the
    same pieces, without a gradient (no loss has them); each only when asked for (else an empty tensor)."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, truncation, with_entropy=True):
        n, c = tokens.shape
        logp = torch.zeros(n, c, dtype=torch.float32, device=logits.device)
        ent = torch.zeros_like(logp) if with_entropy else logp.new_empty(0)
        truncated = torch.zeros_like(logp) if truncation else logp.new_empty(0)
        for rows, cols in pieces(n, c):
            x, tok = _scaled(logits[rows, cols], temperature), tokens[rows, cols].unsqueeze(-1)
            lp = torch.log_softmax(x, dim=-1)
            logp[rows, cols] = lp.gather(-1, tok).squeeze(-1)
            if with_entropy:
                ent[rows, cols] = entropy(lp)
            if truncation:
                truncated[rows, cols] = truncated_logprobs(x, tok.squeeze(-1), *truncation)
        ctx.save_for_backward(logits, tokens)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent, truncated)
        return logp, ent, truncated

    @staticmethod
    def backward(ctx, grad_logp, _entropy, _truncated):
        logits, tokens = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # the last position scores no completion token
        for rows, cols in pieces(*tokens.shape):
            lp = torch.log_softmax(_scaled(logits[rows, cols], ctx.temperature), dim=-1)
            # as autograd did on the whole: gather's backward, log_softmax's, the division's, the cast's
            into = torch.zeros_like(lp).scatter_add_(-1, tokens[rows, cols].unsqueeze(-1), grad_logp[rows, cols].unsqueeze(-1))
            g = torch._log_softmax_backward_data(into, lp, -1, torch.float32)
            grad[rows, cols] = (g if ctx.temperature == 1.0 else g / ctx.temperature).to(logits.dtype)
        return grad, None, None, None, None


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 logits / temperature, with one float32 copy at most: divided in place when .float() made one, out of
    place when the logits were float32 already (the model's own output is left as it was)."""
    x = logits.float()
    if temperature == 1.0:
        return x
    return x.div_(temperature) if x is not logits else x / temperature


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor):
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logp, entropy(logp_all.detach())


@torch.no_grad()
def entropy(logp_all: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the vocabulary, [...] from [..., V] log-probs. No loss has an entropy term (it is a metric
    and the verdict's floor), so no gradient: with one, autograd kept exp(log p) beside log p, a second [N, C, V]
    float32 copy until the backward, and the product a third at the forward's peak. A few positions at a time."""
    flat = logp_all.reshape(-1, logp_all.shape[-1])
    out = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
    for i in range(0, flat.shape[0], SCORE_ROWS):
        piece = flat[i:i + SCORE_ROWS]
        out[i:i + SCORE_ROWS] = -(piece.exp() * piece).sum(-1)
    return out.view(logp_all.shape[:-1])


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)), exact over the vocabulary."""
    s, t = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    return (s.exp() * (s - t)).sum(-1)




def mismatch_metrics(train_logp, sampler_logp, mask, cap: float) -> dict[str, float]:
    """How far the trainer's log-probs are from the rollout engine's for the sampled tokens.

    is_ratio = p_train / p_sampler; k3 here estimates KL(sampler || trainer) from the
    sampler's own tokens (as verl's rollout_corr does); ratio_out_of_cap_frac is the share of
    tokens whose ratio lies outside [1/cap, cap]. A non-finite log-ratio (a token the trainer's truncated
    distribution gives probability 0: -inf) counts as out of cap and is left out of the means, which it would make
    inf or NaN; mismatch_tails counts and shows it.
    """
    log_ratio, mask, out_of_cap = log_ratios(train_logp, sampler_logp, mask, cap)
    ok = mask & torch.isfinite(log_ratio)
    ratio = torch.exp(log_ratio)
    return {
        "mismatch/logprob_diff_mean": masked_mean(log_ratio.abs(), ok).item(),
        "mismatch/k3_kl": masked_mean(ratio - 1 - log_ratio, ok).item(),
        "mismatch/is_ratio_mean": masked_mean(ratio, ok).item(),
        "mismatch/ratio_out_of_cap_frac": masked_mean(out_of_cap.float(), mask).item(),
    }


def log_ratios(train_logp, sampler_logp, mask, cap: float):
    """(log p_train - log p_sampler, 0 where masked; the mask as bool; the masked tokens whose ratio is outside
    [1/cap, cap] or not finite)."""
    mask = mask.bool()
    log_ratio = torch.where(mask, train_logp - sampler_logp, 0.0)
    ratio = torch.exp(log_ratio)
    return log_ratio, mask, mask & (~torch.isfinite(log_ratio) | (ratio > cap) | (ratio < 1 / cap))


def quantile(x: torch.Tensor, q: float) -> float:
    """torch.quantile's default (linear interpolation between the two nearest ranks), by a sort: torch.quantile
    refuses inputs above 2**24 elements, which a long-completion batch's tokens pass."""
    s = x.double().sort().values
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return (s[lo] + (s[hi] - s[lo]) * (pos - lo)).item()


def tail(values: torch.Tensor, prefix: str, quantiles: tuple[int, ...]) -> dict[str, float]:
    """{prefix}_p{q} and {prefix}_max of |values| (1-D), a non-finite value as INF_STANDIN; 0 for no values."""
    v = torch.nan_to_num(values.abs().double(), nan=INF_STANDIN, posinf=INF_STANDIN)
    if not len(v):
        return {**{f"{prefix}_p{q}": 0.0 for q in quantiles}, f"{prefix}_max": 0.0}
    return {**{f"{prefix}_p{q}": quantile(v, q / 100) for q in quantiles}, f"{prefix}_max": v.max().item()}


def mismatch_tails(train_logp, sampler_logp, mask, cap: float) -> dict[str, float]:
    """The mismatch's tails, which mismatch_metrics' means hide: a few tokens far off can dominate an update.

    logratio_abs_*: |log p_train - log p_sampler| over the completion tokens; seq_logratio_abs_*: |the sum over a
    sequence's tokens| (the log of its sequence-level ratio) over the sequences with a token; seq_out_of_cap_frac:
    the share of those sequences with a token whose ratio is outside [1/cap, cap] or not finite;
    logratio_nonfinite_frac: the share of tokens whose log-ratio is not finite. The mean leaves non-finite sums
    out; the quantiles and max count them as INF_STANDIN (a p95 reads about INF_STANDIN when over 5% are)."""
    log_ratio, mask, out_of_cap = log_ratios(train_logp, sampler_logp, mask, cap)
    has = mask.any(1)
    seq = torch.where(mask, log_ratio, 0.0).sum(1)[has].abs()
    finite_seq = seq[torch.isfinite(seq)]
    return {
        **tail(log_ratio[mask], "mismatch/logratio_abs", (95, 99)),
        "mismatch/seq_logratio_abs_mean": finite_seq.mean().item() if len(finite_seq) else 0.0,
        **tail(seq, "mismatch/seq_logratio_abs", (95,)),
        "mismatch/seq_out_of_cap_frac": out_of_cap.any(1)[has].float().mean().item() if has.any() else 0.0,
        "mismatch/logratio_nonfinite_frac": masked_mean((~torch.isfinite(log_ratio)).float(), mask).item(),
    }


IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_mismatch(train_logp, sampler_logp, mask, cap: float) -> dict[str, float]:
    """Every mismatch/* metric of one step: the means (mismatch_metrics) and the tails (mismatch_tails)."""
    return mismatch_metrics(train_logp, sampler_logp, mask, cap) | mismatch_tails(train_logp, sampler_logp, mask, cap)


def is_weights(train_logp, sampler_logp, mask, mode: str, cap_max: float | None, cap_min: float | None = None):
    """Importance-sampling weights correcting for the rollout engine sampling from another policy than the
    trainer's, as TRL 1.16 computes them (vllm_importance_sampling_mode; Yao et al., 2025, for token_truncate):
    the token ratio exp(log p_train - log p_sampler), or for sequence_* modes the sequence's ratio, exp of the sum
    over its masked tokens, given to each of its tokens; *_truncate clamps it to [cap_min, cap_max], *_mask sets
    it to 0 outside. [N, C], a constant in the gradient.

    As TRL, a NaN log-ratio counts as 0 (ratio 1: no correction) and nan_to_num takes an infinite one to the
    largest finite float of its sign: a -inf token's ratio is 0, its sequence's too."""
    diff = torch.where(mask.bool(), train_logp - sampler_logp, 0.0).nan_to_num(nan=0.0)
    if mode.startswith("sequence_"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("_truncate"):
        weight = ratio.clamp(min=cap_min, max=cap_max)
    elif mode.endswith("_mask"):
        lo = cap_min if cap_min is not None else -float("inf")
        hi = cap_max if cap_max is not None else float("inf")
        weight = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    else:
        raise ValueError(f"is_mode {mode!r}: valid: {', '.join(IS_MODES)}")
    return weight.expand_as(train_logp).detach()


def is_weight_metrics(weight: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The correction's effect: its mean weight over the completion tokens, and the share it sets to 0."""
    return {"mismatch/is_weight_mean": masked_mean(weight, mask).item(),
            "mismatch/is_masked_frac": masked_mean((weight == 0).float(), mask).item()}


def tis_weights(train_logp, sampler_logp, cap: float) -> torch.Tensor:
    """Truncated importance sampling per token, min(p_train / p_sampler, cap): is_weights' token_truncate without
    a lower cap."""
    return torch.exp(train_logp - sampler_logp).clamp(max=cap).detach()


def truncated_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """log-prob of each token under `logits` (temperature-scaled, [..., V]) truncated as the samplers truncate
    (transformers' TopK then TopP warpers, vLLM's apply_top_k_top_p): the top_k largest logits (ties at the k-th
    kept), then the nucleus, the fewest largest whose probability sum reaches top_p, renormalised; -inf for a
    token outside. The engines report log-probs of that distribution (hf: SamplerLogprobs; vLLM: processed
    logprobs), so a ratio against the full distribution's would be biased low (TRL issue 6789).

    The nucleus is taken as every logit at or above the smallest kept one: where the warpers keep an arbitrary
    part of a run of equal logits at the boundary this keeps all of it. No gradient (a metric's and the IS
    weights' input); costs a sort over the vocabulary per position."""
    with torch.no_grad():
        logits = logits.detach()
        if 0 < top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if top_p < 1.0:
            ascending = logits.sort(dim=-1).values
            # as both samplers: drop the smallest whose cumulative mass is <= 1 - top_p, keeping at least the largest
            n_dropped = (ascending.softmax(-1).cumsum_(-1) <= 1 - top_p).sum(-1, keepdim=True)
            n_dropped = n_dropped.clamp(max=logits.shape[-1] - 1)
            threshold = ascending.gather(-1, n_dropped)
            del ascending
            logits = logits.masked_fill(logits < threshold, -float("inf"))
        return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sequence_logprob(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(completion | prompt): the sum of its tokens' log-probs, [N]."""
    return (logp * mask.to(logp.dtype)).sum(-1)


def best_worst_pairs(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """On-policy preference pairs: per group, the first completion with the highest reward (chosen)
    and the first with the lowest (rejected), as indices into the flat batch. A group whose rewards
    are all equal states no preference and gives no pair."""
    r = rewards.view(-1, group_size)
    offset = torch.arange(r.shape[0], device=r.device) * group_size
    keep = r.max(1).values > r.min(1).values
    return (offset + r.argmax(1))[keep], (offset + r.argmin(1))[keep]


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float):
    """DPO (Rafailov et al., 2023) from sequence log-probs: per pair -log sigmoid(margin), where
    margin = beta (log pi/pi_ref of chosen) - beta (log pi/pi_ref of rejected). Returns (loss per
    pair, implicit reward of the chosen, of the rejected), the rewards detached (logged)."""
    chosen_reward = beta * (chosen - ref_chosen)
    rejected_reward = beta * (rejected - ref_rejected)
    return -torch.nn.functional.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()
