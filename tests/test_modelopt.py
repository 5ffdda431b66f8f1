"""ModelOpt fake quantization on CPU: every format trains through real ModelOpt quantizers."""

import pytest
import torch
from test_grpo import same, spy_on_policy

from harness.execution.lifecycle import run_one
from harness.models import checkpoint
from harness.models.loading import load_policy
from harness.quant.nvfp4_cpu import nvfp4_fake_quant
from harness.results.layout import read_metrics

from conftest import REPO, tiny_run_config

FORMATS = ["nvfp4_w4a16", "nvfp4_w4a4", "fp8", "int8_sq", "int4_awq"]


@pytest.mark.parametrize("shape, dtype", [((64, 128), torch.float32), ((33, 40), torch.float32), ((16, 256), torch.bfloat16)])
def test_cpu_nvfp4_matches_modelopt_reference(shape, dtype):
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.rand(shape[0], 1) * 3).to(dtype)
    x[0, :16] = 0  # an all-zero block
    amax = x.abs().amax().float()
    padded = torch.nn.functional.pad(x, (0, (-shape[1]) % 16))
    qt, scale, scale2 = NVFP4QTensor.quantize(padded, 16, weights_scaling_factor_2=amax / (6 * 448))
    ref = qt.dequantize(dtype=torch.float32, scale=scale, double_scale=scale2, block_sizes={-1: 16})[:, : shape[1]]
    ours = nvfp4_fake_quant(x, amax)
    assert ours.dtype == dtype and ours.shape == x.shape
    assert torch.allclose(ours.float(), ref.to(dtype).float(), atol=1e-6, rtol=0)
    assert (ours.float() - x.float()).abs().max() > 0  # it does quantize


def test_cpu_nvfp4_gradient_is_straight_through():
    x = torch.randn(4, 32, requires_grad=True)
    nvfp4_fake_quant(x, x.detach().abs().amax()).mul(torch.arange(32.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(32.0).expand(4, 32))


def quantizers(model):
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]


@pytest.mark.parametrize("quant", FORMATS)
def test_each_format_trains_lora_over_a_frozen_quantized_base(quant, tmp_path, tiny_model, monkeypatch):
    seen = spy_on_policy(monkeypatch)
    cfg = tiny_run_config(steps=2, eval_every=2, checkpoint_every=2).model_copy(update={"quant": quant})
    s = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert s["status"] == "ok", s.get("traceback")
    model, before = seen["model"], seen["at_load"]
    assert quantizers(model), "no ModelOpt quantizer is active"
    after = dict(model.named_parameters())
    lora_b = [n for n in after if "lora_B" in n]
    assert any(not torch.equal(after[n], before[n]) for n in lora_b)
    assert all(same(after[n], before[n]) for n in after if "lora_" not in n)
    assert [r["step"] for r in read_metrics(tmp_path / cfg.run_id)] == [0, 1, 2]


def test_full_weight_qat_changes_the_base(tmp_path, tiny_model, monkeypatch):
    seen = spy_on_policy(monkeypatch)
    cfg = tiny_run_config(steps=2).model_copy(update={"quant": "nvfp4_w4a16"})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"trainable": "full"})})
    s = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert s["status"] == "ok", s.get("traceback")
    after = dict(seen["model"].named_parameters())
    assert not any("lora_" in n for n in after)
    assert any(not torch.equal(after[n], seen["at_load"][n]) for n in after if n.endswith("q_proj.weight"))
    assert quantizers(seen["model"])


def test_amax_survives_checkpoint_and_resume(tmp_path, tiny_model, monkeypatch):
    seen = spy_on_policy(monkeypatch)
    base = tiny_run_config(steps=2, checkpoint_every=2).model_copy(update={"quant": "nvfp4_w4a4"})
    cfg = base.model_copy(update={"modelopt": base.modelopt.model_copy(update={"recalibrate_every": 1})})
    assert run_one(cfg, tmp_path / "run", torch.device("cpu"))["status"] == "ok"
    trained = {k: v.clone() for k, v in seen["model"].state_dict().items() if k.endswith("_amax")}

    fresh, _ = load_policy(cfg, torch.device("cpu"), torch.float32)
    calibrated = {k: v.clone() for k, v in fresh.state_dict().items() if k.endswith("_amax")}
    opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])
    assert checkpoint.restore(tmp_path / "run", fresh, opt, __import__("random").Random()) == 2
    restored = {k: v for k, v in fresh.state_dict().items() if k.endswith("_amax")}
    assert restored.keys() == trained.keys() and len(trained) > 0
    assert all(torch.equal(restored[k], trained[k]) for k in trained)
    # recalibration with the trained adapter moved some activation amax: the test can tell
    assert any(not torch.equal(calibrated[k], trained[k]) for k in trained)


def test_custom_config_escape_hatch(tmp_path, tiny_model):
    from harness.config.run import RunConfig

    harsh = str(REPO / "matrices" / "quant" / "int2_weights.yaml")
    for quant_cfg in (harsh, "FP8_DEFAULT_CFG"):
        cfg = tiny_run_config(steps=1, eval_every=1).model_copy(update={"quant": "modelopt"})
        cfg = cfg.model_copy(update={"modelopt": cfg.modelopt.model_copy(update={"quant_cfg": quant_cfg})})
        s = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
        assert s["status"] == "ok", s.get("traceback")
    with pytest.raises(ValueError, match="needs modelopt.quant_cfg"):
        RunConfig(quant="modelopt")
    cfg = tiny_run_config(steps=1).model_copy(update={"quant": "modelopt"})
    cfg = cfg.model_copy(update={"modelopt": cfg.modelopt.model_copy(update={"quant_cfg": "NVFP4_DEFALT_CFG"})})
    s = run_one(cfg, tmp_path / "bad", torch.device("cpu"))
    assert s["status"] == "failed" and "did you mean 'NVFP4_DEFAULT_CFG'" in s["error"]


def test_bitsandbytes_weights_cannot_train_in_full():
    from harness.config.run import RunConfig

    with pytest.raises(ValueError, match="trainable: full needs"):
        RunConfig(quant="nf4", train={"trainable": "full"})


def test_calibration_on_a_named_dataset(tiny_model):
    from conftest import FIXTURES

    cfg = tiny_run_config().model_copy(update={"quant": "nvfp4_w4a4"})
    own, _ = load_policy(cfg, torch.device("cpu"), torch.float32)
    named = cfg.model_copy(update={"modelopt": cfg.modelopt.model_copy(
        update={"quant_calib_dataset": str(FIXTURES / "calib.jsonl")})})
    other, _ = load_policy(named, torch.device("cpu"), torch.float32)
    a = {k: v for k, v in own.state_dict().items() if k.endswith("input_quantizer._amax")}
    b = {k: v for k, v in other.state_dict().items() if k.endswith("input_quantizer._amax")}
    assert a.keys() == b.keys() and a
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the activations seen differ, so does amax
