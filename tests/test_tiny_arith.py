import hashlib
import json
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.models.tiny_arith import SHIPPED, ModelChecksumError, build, checksum, shipped


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


def test_the_shipped_model_is_checked_file_by_file(tmp_path):
    copy = tmp_path / SHIPPED.name
    shutil.copytree(SHIPPED, copy)
    shutil.copy(SHIPPED.with_suffix(".sha256"), copy.with_suffix(".sha256"))
    assert shipped(copy) == copy
    assert checksum(copy) == checksum(SHIPPED) == hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest()

    other = tmp_path / "b" / SHIPPED.name  # a fresh folder: the check above is remembered per folder
    shutil.copytree(copy, other)
    shutil.copy(copy.with_suffix(".sha256"), other.with_suffix(".sha256"))
    weights = bytearray((other / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of one weight
    (other / "model.safetensors").write_bytes(weights)
    listed = checksum(SHIPPED)  # what the sha256 list says of the weights
    with pytest.raises(ModelChecksumError, match=rf"model.safetensors: sha256 (?!{listed})[0-9a-f]{{64}}, .*says {listed}"):
        shipped(other)


@pytest.mark.slow
def test_a_rebuild_is_cached_and_says_whether_it_is_the_shipped_model(monkeypatch):
    """`harness models build`: the recipe again, on this machine (35 s on one thread)."""
    import harness.models.tiny_arith

    built = build(log=lambda *_: None)
    info = json.loads((built / "warm_start.json").read_text())
    assert 0.3 <= info["held_out_accuracy"] <= 0.6

    def no_second_build(*args):
        raise AssertionError("built again")

    monkeypatch.setattr(harness.models.tiny_arith, "_build_into", no_second_build)  # not a stopwatch: a busy machine is slow too
    assert build(log=lambda *_: None) == built
    print(f"rebuilt {checksum(built)[:12]}, shipped {checksum(SHIPPED)[:12]}")


def test_an_empty_qrl_cache_means_the_default_not_the_working_directory(monkeypatch):
    from pathlib import Path

    from harness.models.tiny_arith import cache_root

    monkeypatch.setenv("QRL_CACHE", "")
    assert cache_root() == Path.home() / ".cache" / "quant-rl"
    monkeypatch.setenv("QRL_CACHE", "/tmp/elsewhere")
    assert cache_root() == Path("/tmp/elsewhere")
