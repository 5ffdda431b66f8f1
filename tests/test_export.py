import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import harness.recipes.common as common
from harness.cli import app
from harness.execution.lifecycle import run_one

from conftest import tiny_run_config


@pytest.mark.parametrize("quant", ["nf4", "nvfp4_w4a16"])
def test_export_merges_into_the_dequantized_base_and_loads(quant, tmp_path, tiny_model, monkeypatch):
    seen = {}
    real = common.load_policy
    monkeypatch.setattr(common, "load_policy", lambda *a, **k: seen.setdefault("policy", real(*a, **k)))
    cfg = tiny_run_config(steps=3, lr=1e-2).model_copy(update={"quant": quant})
    run_dir = tmp_path / cfg.run_id
    assert run_one(cfg, run_dir, torch.device("cpu"))["status"] == "ok"

    res = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert not any("lora" in n for n, _ in model.named_parameters())
    ids = tok(["23+58=", "11+11="], return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]

    # the export computes what the run trained (the quantized base plus the adapter), much more
    # closely than merging the adapter into the original, never-quantized weights would
    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run_dir / "adapter").merge_and_unload()
    trained = seen["policy"][0].eval()
    with torch.no_grad():
        want = trained(input_ids=ids).logits.float()
        error = (model(input_ids=ids).logits.float() - want).abs().max()
        gap = (naive(input_ids=ids).logits.float() - want).abs().max()
    print(f"{quant}: export error {error:.4f}, naive merge {gap:.4f}")
    assert error < gap / 3
    # ModelOpt formats also leave ModelOpt's own quantized HF checkpoint
    assert (tmp_path / "out" / "modelopt" / "hf_quant_config.json").exists() == (quant == "nvfp4_w4a16")
