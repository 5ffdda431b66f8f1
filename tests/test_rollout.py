"""The in-process rollout engine: prompt encoding, and sampler log-probs the trainer can reproduce."""

import pytest
import torch

from conftest import tiny_run_config, with_sampling_defaults


def test_repeated_prompts_encode_as_each_one_alone(tiny_model):
    from transformers import AutoTokenizer

    from harness.rollout.hf import encode_prompts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = ["1+2=", "33+44=", "1+2=", "5+5=", "33+44=", "33+44="]
    ids, mask = encode_prompts(tok, prompts, torch.device("cpu"))
    tok.padding_side = "left"
    plain = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert torch.equal(ids, plain["input_ids"]) and torch.equal(mask, plain["attention_mask"])
    assert mask[0].tolist()[: mask.shape[1] - 4] == [0] * (mask.shape[1] - 4)  # left-padded to the longest


def sample(model_dir, **rollout):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.recipes.rl_math import completion_logprobs, mismatch_metrics
    from harness.rollout.hf import HFEngine
    from harness.tasks import load_task

    cfg = tiny_run_config()
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate({"max_new_tokens": 12, **rollout})})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    batch = HFEngine(model, AutoTokenizer.from_pretrained(model_dir), cfg).generate(
        [p.prompt for p in load_task(cfg.task).train[:16]] * 4)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                                      cfg.rollout.temperature)
    return batch, mismatch_metrics(logp, batch.sampler_logprobs, batch.completion_mask, cap=2.0)


def test_top_p_leaves_no_nan_at_padding(tiny_model):
    """After EOS the pad token is often outside the nucleus (-inf): every metric of such a batch was
    NaN, and each run with top_p < 1 stopped at step 1 as diverged."""
    batch, m = sample(tiny_model, temperature=0.7, top_p=0.9)
    assert (batch.completion_mask == 0).any()
    assert torch.isfinite(batch.sampler_logprobs).all() and (batch.sampler_logprobs[batch.completion_mask == 0] == 0).all()
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values()), m


def test_the_checkpoints_own_sampling_defaults_do_not_reach_the_sampler(tiny_model, tmp_path):
    """A repetition_penalty in generation_config.json made the in-process sampler another policy than
    the trainer's: logprob_diff_mean 0.24 instead of ~1e-7."""
    _, m = sample(with_sampling_defaults(tiny_model, tmp_path / "released"), temperature=1.0)
    assert m["mismatch/logprob_diff_mean"] < 1e-4 and m["mismatch/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4), m


def scores_reference(engine, prompts, seed):
    """The sampler's log-probs as HFEngine computed them before issue 23: `generate` with output_scores (temperature and
    top-p as its warpers), the stacked scores' log_softmax gathered at the completion. Same seed, same settings."""
    from transformers import GenerationConfig

    from harness.rollout.hf import completion_mask, encode_prompts, seeded

    model, cfg, tok = engine.model, engine.cfg, engine.tokenizer
    ids, attention = encode_prompts(tok, prompts, torch.device("cpu"))
    own, model.generation_config = model.generation_config, GenerationConfig()
    model.eval()
    try:
        with seeded(torch.device("cpu"), seed), torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=cfg.max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, return_dict_in_generate=True,
                                 output_scores=True, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                                 top_k=cfg.top_k, remove_invalid_values=True)
    finally:
        model.generation_config = own
    completion = out.sequences[:, ids.shape[1]:]
    mask = completion_mask(completion, tok.eos_token_id)
    completion = completion.masked_fill(mask == 0, tok.pad_token_id)
    scores = torch.stack(out.scores, dim=1).float()
    logprobs = torch.log_softmax(scores, dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    return completion, torch.where(mask.bool(), logprobs, 0.0)


@pytest.mark.parametrize("temperature, top_p, top_k", [(0.7, 0.9, 0), (1.0, 1.0, 0), (0.7, 0.9, 5), (1.0, 1.0, 3)])
def test_streamed_sampler_logprobs_match_the_stacked_scores(tiny_model, temperature, top_p, top_k):
    """Issue 23: the sampler's log-probs are taken one step at a time (SamplerLogprobs) instead of from every step's
    [N, V] scores stacked (~60 GB at 128 x 256 tokens, V 152k). Same tokens from the same seed, same log-probs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.rollout.hf import HFEngine
    from harness.tasks import load_task

    cfg = tiny_run_config()
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate(
        {"max_new_tokens": 12, "temperature": temperature, "top_p": top_p, "top_k": top_k})})
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    engine = HFEngine(model, AutoTokenizer.from_pretrained(tiny_model), cfg)
    prompts = [p.prompt for p in load_task(cfg.task).train[:16]] * 4
    batch = engine.generate(prompts, seed=1234)
    completion, reference = scores_reference(engine, prompts, seed=1234)
    assert torch.equal(batch.completion_ids, completion)
    assert batch.sampler_logprobs.dtype == torch.float32 and torch.isfinite(batch.sampler_logprobs).all()
    assert (batch.completion_mask == 0).any() and (batch.sampler_logprobs[batch.completion_mask == 0] == 0).all()
    assert (batch.sampler_logprobs[batch.completion_mask == 1] < 0).any()  # not all certain: a test that can fail
    # relative too: the two log_softmaxes run on different shapes ([N, V] here, [N, C, V] stacked), which CPU kernels
    # may round apart by vector width (an avx512_fp16 CPU: 1.03e-5 on -2.26). Skipping the warpers moved them 0.22+
    torch.testing.assert_close(batch.sampler_logprobs, reference, atol=1e-5, rtol=1e-4)


def test_policy_weights_are_peft_own_merge(tiny_model):
    """What a merged LoRA sync (rollout.lora_sync: merged) writes into vLLM: every weight of the policy under its HF
    name, W + scale BA in the adapted layers, as peft's merge_and_unload of a trained adapter, and no adapter tensor."""
    import copy

    from harness.models.loading import load_policy
    from harness.rollout.engine_check import perturb
    from harness.rollout.merged_weights import policy_weights

    cfg = tiny_run_config(dtype="float32")
    model, _ = load_policy(cfg, torch.device("cpu"), torch.float32)
    perturb(model, lora=True, seed=3, scale=0.5)
    pushed = dict(policy_weights(model))
    reference = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    assert set(pushed) == set(reference)
    adapted = 0
    for name, weight in pushed.items():
        torch.testing.assert_close(weight, reference[name], rtol=0, atol=1e-6)
        base = model.get_parameter("base_model.model." + name.replace(".weight", ".base_layer.weight")
                                   if name.endswith("proj.weight") else "base_model.model." + name)
        adapted += bool((weight - base).abs().max() > 1e-3)  # the adapter moved it: the bare base would fail above
    assert adapted == sum(".lora_A." in n for n, _ in model.named_parameters()) >= 7


@pytest.mark.parametrize("dtype, delta, lost", [
    (torch.bfloat16, 2.0 ** -9, 1.0),        # under half of bf16's step at 1.0 (2^-7): 1 + delta is stored as 1
    (torch.bfloat16, 2.0 ** -7, 0.0),        # one whole step: stored exactly
    (torch.bfloat16, 3 * 2.0 ** -9, 1 / 3),  # 1 + 3/512 is stored as 1 + 4/512: off by 1/512, a third of delta
    (torch.float32, 2.0 ** -9, 0.0)])
def test_a_merged_sync_measures_the_update_its_dtype_loses(dtype, delta, lost):
    """mismatch/merge_rel_err, hand-computed: base weights all 1.0, the adapter adding `delta` to each. A merged copy
    in bf16 rounds each weight's update to bf16's step at 1.0 (2^-7)."""
    import peft

    from harness.rollout.merged_weights import merge_rel_err, policy_weights

    base = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False)).to(dtype)
    base[0].weight.data.fill_(1.0)
    model = peft.get_peft_model(base, peft.LoraConfig(r=1, lora_alpha=2, target_modules=["0"]))  # scale 2
    layer = model.base_model.model[0]
    layer.lora_A["default"].weight.data.fill_(0.5)
    layer.lora_B["default"].weight.data.fill_(delta)  # scale * B A = 2 * delta * 0.5 = delta
    rounding = {}
    (_, weight), = policy_weights(model, rounding)
    assert weight.dtype == dtype and torch.equal(weight, torch.full((4, 4), 1.0 + delta).to(dtype))
    assert rounding["delta_sq"] == pytest.approx(16 * delta ** 2)
    assert merge_rel_err(rounding) == pytest.approx(lost, abs=1e-12)


def test_a_merged_sync_refuses_an_adapter_on_a_tied_weight():
    """With the LM head tied to the embeddings, peft lists the shared weight once (as the embeddings'): an adapter on
    the head would be left out of the merged weights without a word. It is refused before anything is written."""
    import peft
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from harness.rollout.merged_weights import policy_weights

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=True)
    tied = peft.get_peft_model(Qwen2ForCausalLM(config), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="tied weight.*lm_head.*lora_sync adapter"):
        next(policy_weights(tied))
    untied = peft.get_peft_model(Qwen2ForCausalLM(config), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert "model.layers.0.self_attn.q_proj.weight" in dict(policy_weights(untied))


def test_a_grouped_batch_prefills_each_distinct_prompt_once_and_samples_the_same(tiny_model):
    """GRPO's batch repeats each prompt group_size times in a row: prompt_cache prefills each distinct prompt once
    and repeats its cache. With the same seed, the same completions and sampler log-probs as prefilling every copy,
    greedy too; the first forward sees the distinct prompts alone. Repeats out of order are shared alike. A batch of
    distinct prompts (a held-out eval) is left to generate where it is no taller than a rollout's prefill, and
    prefilled a rollout's prompts at a time where it is taller: the same cache, the same greedy completions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.rollout.hf import HFEngine, encode_distinct, prompt_cache

    cfg = tiny_run_config(prompts_per_step=6, group_size=4)  # the rollout below: 6 prompts x 4 completions
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate({"max_new_tokens": 12})})
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    distinct = ["1+2=", "33+44=", "5+55=", "12+3=", "7+8=", "91+19="]  # 4 to 6 tokens: left padding
    grouped = [p for p in distinct for _ in range(4)]
    forwards = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: forwards.append(tuple(args[0].shape)))
    runs = {}
    for share in (True, False):
        engine = HFEngine(model, tokenizer, cfg)
        engine.share_prompts = share
        forwards.clear()
        torch.manual_seed(0)
        sampled = engine.generate(grouped)
        runs[share] = (sampled, engine.generate(grouped, greedy=True), forwards[:3])
    hook.remove()
    (shared, shared_greedy, shared_forwards), (plain, plain_greedy, plain_forwards) = runs[True], runs[False]
    width = plain.prompt_ids.shape[1]
    assert (plain.prompt_mask == 0).any()  # left-padded
    # the distinct prompts' prefill, then generate goes on from the last prompt token: it used the cache
    assert shared_forwards == [(6, width - 1), (24, 1), (24, 1)] and plain_forwards == [(24, width), (24, 1), (24, 1)]
    assert torch.equal(shared.completion_ids, plain.completion_ids) and shared.texts == plain.texts
    assert torch.allclose(shared.sampler_logprobs, plain.sampler_logprobs, atol=1e-5)
    assert shared_greedy.texts == plain_greedy.texts
    assert prompt_cache(model, *encode_distinct(tokenizer, distinct, torch.device("cpu")), rows=6) is None

    def each_row_its_own(distinct_ids, distinct_mask, copy_of, rows=6):
        cache = prompt_cache(model, distinct_ids, distinct_mask, copy_of, rows)
        ids, mask = distinct_ids[copy_of], distinct_mask[copy_of]
        with torch.no_grad():
            whole = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True,
                          position_ids=(mask[:, :-1].cumsum(-1) - 1).clamp(min=0)).past_key_values
        assert cache.get_seq_length() == ids.shape[1] - 1
        for ours, theirs in zip(cache.layers, whole.layers):
            assert torch.allclose(ours.keys, theirs.keys, atol=1e-5) and torch.allclose(ours.values, theirs.values, atol=1e-5)

    each_row_its_own(*encode_distinct(tokenizer, distinct * 4, torch.device("cpu")))  # repeats in any order
    # two prompts with the same ids, one padded (a prompt that starts with the pad id's text): each its own mask
    pad, digit = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("5")
    each_row_its_own(torch.tensor([[pad, pad, digit, digit]] * 2), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]),
                     torch.tensor([0, 1, 0, 1]))

    each_row_its_own(*encode_distinct(tokenizer, distinct, torch.device("cpu")), rows=4)  # distinct, 4 + 2 a forward
    each_row_its_own(*encode_distinct(tokenizer, distinct * 4, torch.device("cpu")), rows=4)  # and repeated
    # a held-out eval taller than a rollout's prefill (HFEngine.prefill_rows, the rollout's distinct prompts):
    # prefilled 4 prompts a forward, the same greedy completions as generate's own prefill of all 6
    engine = HFEngine(model, tokenizer, tiny_run_config())
    assert engine.prefill_rows == 4 and engine.eval_batch == 16  # tiny_run_config: 4 prompts x 4 completions
    runs = {}
    for share in (True, False):
        engine.share_prompts = share
        forwards.clear()
        hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: forwards.append(tuple(args[0].shape)))
        runs[share] = (engine.generate(distinct, greedy=True).texts, forwards[:3])
        hook.remove()
    assert runs[True][1] == [(4, width - 1), (2, width - 1), (6, 1)] and runs[False][1][0] == (6, width)
    assert runs[True][0] == runs[False][0]


def test_in_process_generation_leaves_cudnn_attention_out(tiny_model):
    """PyTorch's SDPA picks cuDNN first on an H100, whose host cost was ~54 ms of each ~125 ms decode step (issue
    23's profile): HFEngine.generate's forwards, the shared prompt prefill's too, run without it
    (rollout.hf.DECODE_ATTENTION), and PyTorch's own choice is back after; `attention` None leaves the choice to
    PyTorch. On a CPU (no cuDNN) the completions are the same either way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.rollout.hf import HFEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    engine = HFEngine(model, tokenizer, tiny_run_config())
    prompts = [p for p in ("1+2=", "33+44=") for _ in range(4)]  # repeats: the shared prefill runs a forward first
    texts = []
    for cudnn in (False, True):  # a new engine's default, then PyTorch's choice
        if cudnn:
            engine.attention = None
        seen.clear()
        assert torch.backends.cuda.cudnn_sdp_enabled()
        texts.append(engine.generate(prompts, greedy=True).texts)
        assert len(seen) > 2 and set(seen) == {cudnn}, (cudnn, seen)
        assert torch.backends.cuda.cudnn_sdp_enabled()
    assert texts[0] == texts[1]


def test_a_hybrid_models_prompts_are_left_to_generates_own_prefill():
    """Falcon-H1's layers keep convolution and recurrent states per row beside their keys and values: prompt_cache's
    parts would leave those the first part's rows, and generate would then fail on mismatched sizes. It returns
    None for such a cache, split or grouped, and generate prefills the batch itself."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    from harness.rollout.hf import prompt_cache

    config = FalconH1Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=64, mamba_n_heads=4,
                            mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=4)
    torch.manual_seed(0)
    model = FalconH1ForCausalLM(config).eval()
    ids = torch.randint(2, 60, (5, 6))
    mask = torch.ones_like(ids)
    assert prompt_cache(model, ids, mask, torch.arange(5), rows=2) is None  # 5 distinct prompts, 2 a forward
    assert prompt_cache(model, ids, mask, torch.arange(5).repeat(2), rows=8) is None  # grouped
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (5, 9)
