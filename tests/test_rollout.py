"""Prompt encoding for rollouts: a GRPO batch repeats each prompt group_size times."""

import torch


def test_repeated_prompts_encode_as_each_one_alone(tiny_model):
    from transformers import AutoTokenizer

    from harness.rollout import encode_prompts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = ["1+2=", "33+44=", "1+2=", "5+5=", "33+44=", "33+44="]
    ids, mask = encode_prompts(tok, prompts, torch.device("cpu"))
    tok.padding_side = "left"
    plain = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert torch.equal(ids, plain["input_ids"]) and torch.equal(mask, plain["attention_mask"])
    assert mask[0].tolist()[: mask.shape[1] - 4] == [0] * (mask.shape[1] - 4)  # left-padded to the longest
