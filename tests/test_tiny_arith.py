import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.models.tiny_arith import build


def test_builtin_model_is_a_standard_hf_folder_with_headroom(tiny_model):
    info = json.loads((tiny_model / "warm_start.json").read_text())
    assert 0.3 <= info["held_out_accuracy"] <= 0.6
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    c = model.config
    assert c.model_type == "qwen2"
    assert all(d % 64 == 0 for d in (c.hidden_size, c.intermediate_size, c.vocab_size))
    text = "23+58=\\boxed{81}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_second_build_reuses_the_cache(tiny_model, monkeypatch):
    import harness.models.tiny_arith

    def no_second_build(*args):
        raise AssertionError("built again")

    stamp = (tiny_model / "model.safetensors").stat().st_mtime
    monkeypatch.setattr(harness.models.tiny_arith, "_build_into", no_second_build)  # not a stopwatch: a busy machine is slow too
    assert build(log=lambda *_: None) == tiny_model
    assert (tiny_model / "model.safetensors").stat().st_mtime == stamp


def test_an_empty_qrl_cache_means_the_default_not_the_working_directory(monkeypatch):
    from pathlib import Path

    from harness.models.tiny_arith import cache_root

    monkeypatch.setenv("QRL_CACHE", "")
    assert cache_root() == Path.home() / ".cache" / "quant-rl"
    monkeypatch.setenv("QRL_CACHE", "/tmp/elsewhere")
    assert cache_root() == Path("/tmp/elsewhere")
