"""The pieces every recipe shares: log-probs, advantages, KL, clipping, masking, loss aggregation,
and the per-algorithm objectives (DPO's, SFT's) as functions of log-probs.

Each is checked against hand-computed cases in tests/test_rl_math.py.
"""

from __future__ import annotations

import torch


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


def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0):
    """Logits that score each completion token, [N, C, V], float32, divided by the temperature.

    The logits at position t predict token t+1, so the completion's C tokens are scored by the
    logits at positions P-1 .. P+C-2. Positions follow the attention mask, as in `generate`, so
    left-padded prompts get the positions they were sampled with. Dividing by the sampling
    temperature makes the trained policy the one that was sampled from.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    n_completion = completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                   logits_to_keep=n_completion + 1).logits
    return logits[:, :-1].float() / temperature


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0):
    """(log-prob of each completion token, entropy of each position's distribution), both [N, C]."""
    logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature)
    return token_logprobs_and_entropy(logits, completion_ids)


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor):
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)), exact over the vocabulary."""
    s, t = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    return (s.exp() * (s - t)).sum(-1)


def mismatch_metrics(train_logp, sampler_logp, mask, cap: float) -> dict[str, float]:
    """How far the trainer's log-probs are from the rollout engine's for the sampled tokens.

    is_ratio = p_train / p_sampler; k3 here estimates KL(sampler || trainer) from the
    sampler's own tokens (as verl's rollout_corr does); ratio_out_of_cap_frac is the share of
    tokens whose ratio lies outside [1/cap, cap].
    """
    log_ratio = train_logp - sampler_logp
    ratio = torch.exp(log_ratio)
    return {
        "mismatch/logprob_diff_mean": masked_mean(log_ratio.abs(), mask).item(),
        "mismatch/k3_kl": masked_mean(ratio - 1 - log_ratio, mask).item(),
        "mismatch/is_ratio_mean": masked_mean(ratio, mask).item(),
        "mismatch/ratio_out_of_cap_frac": masked_mean(((ratio > cap) | (ratio < 1 / cap)).float(), mask).item(),
    }


def tis_weights(train_logp, sampler_logp, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al., 2025, "off-policy RL from an efficient rollout
    engine"): per-token min(p_train / p_sampler, cap), a constant in the gradient, correcting for
    the rollout engine sampling from a slightly different policy than the trainer's."""
    return torch.exp(train_logp - sampler_logp).clamp(max=cap).detach()


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
