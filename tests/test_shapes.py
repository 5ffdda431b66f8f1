"""`shape:<name>`: released architectures with random weights (harness/models/shape.py). Every shipped config
builds at its published size; the tokenizer covers the real vocabulary; the weights are made on the device with
no checkpoint, the same for every format; nf4 keeps everything but its linears in the compute dtype and LoRA
trains; and runs of a shape are recorded as random weights and read "Not judged (random weights)"."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from harness.config.run import RunConfig
from harness.models import shape
from harness.models.loading import identity, load_model, load_policy, resolve
from harness.registries import QUANT, SHAPES
from harness.registry import UnknownName
from harness.results.verdict import NOT_JUDGED

CPU = torch.device("cpu")
# parameter counts as published (HF model cards, the safetensors metadata): tied embeddings counted once
PUBLISHED = {"qwen2.5-0.5b": 0.494e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-7b": 7.62e9, "qwen3-0.6b": 0.6e9, "qwen3-1.7b": 1.7e9,
             "qwen3-8b": 8.2e9, "llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9, "llama-3.1-8b": 8.03e9}


def meta_model(name: str):
    """The shipped config's model on the meta device (no folder is made: make test builds three shapes' folders)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape.spec(name)["config"]))


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def shrunk(name: str, out: Path, layers: int = 2, vocab: int | None = None) -> Path:
    """A copy of a shape's folder with fewer layers (and a smaller vocabulary): still a shape folder (random
    weights, made at load), small enough to train in seconds on a CPU."""
    from transformers import AutoConfig

    shutil.copytree(resolve(f"shape:{name}"), out)
    config = AutoConfig.from_pretrained(out)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    if vocab:
        config.vocab_size = vocab
        shape.make_tokenizer(vocab).save_pretrained(out)
    config.save_pretrained(out)
    facts = json.loads((out / "shape.json").read_text())
    (out / "shape.json").write_text(json.dumps(facts | {"tokenizer": shape.tokenizer_note(config.vocab_size)}))
    return out


def test_every_shipped_config_is_a_registered_shape():
    assert sorted(p.stem for p in shape.SHAPES_DIR.glob("*.json")) == SHAPES.names() == sorted(PUBLISHED)
    for name in SHAPES.names():
        assert shape.spec(name)["config_of"] == SHAPES.value(name)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_shape_builds_at_its_published_size(name):
    model, spec = meta_model(name), shape.spec(name)["config"]
    assert n_params(model) == pytest.approx(PUBLISHED[name], rel=0.02)
    text = model.config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.vocab_size) == tuple(spec[k] for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size"))
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == spec["tie_word_embeddings"]
    assert model.get_input_embeddings().weight.shape == (spec["vocab_size"], spec["hidden_size"])


def test_the_tokenizer_covers_the_real_vocabulary_and_every_id_decodes():
    from harness.models.loading import load_tokenizer
    from harness.models.tiny_arith import make_tokenizer

    tokenizer = load_tokenizer(resolve("shape:qwen2.5-7b"))  # as runs load it
    assert len(tokenizer) == 152064
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert all(tokens) and len(set(tokens)) == len(tokens)
    assert not any(c.isdigit() for t in tokens[100:] for c in t)  # no answer parser reads a number in a placeholder
    assert tokenizer.decode([151935, 152063]) == "<|iqtr|><|iqyp|>"
    tiny = make_tokenizer()
    assert tokenizer("12 + 34 =")["input_ids"] == tiny("12 + 34 =")["input_ids"]  # the tiny model's own ids, spaces too
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (tiny.pad_token_id, tiny.eos_token_id)


def test_a_shape_is_validated_with_did_you_mean_and_recorded_as_random_weights():
    assert RunConfig(model="shape:qwen3-0.6b").model == "shape:qwen3-0.6b"
    with pytest.raises(ValueError, match="did you mean 'qwen2.5-1.5b'.*Valid: llama-3.1-8b"):
        RunConfig(model="shape:qwen2.5-1.5")
    with pytest.raises(UnknownName):
        SHAPES.canonical("gpt-5")
    facts = identity("shape:qwen3-0.6b")
    assert facts["random_weights"] is True and facts["shape"] == "qwen3-0.6b" and facts["config_of"] == "Qwen/Qwen3-0.6B"
    assert facts["parameters"] == n_params(meta_model("qwen3-0.6b")) == 596_049_920
    assert facts["tokenizer"] == "tiny + placeholders to 151936 ids (the real vocab's size, not its tokens)"
    folder = Path(resolve("shape:qwen3-0.6b"))
    assert not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))  # no weights on disk


def test_every_format_starts_from_the_same_random_weights(tmp_path):
    """Each weight is drawn from its own seeded generator: bf16 and nf4 loads (and a distill teacher) hold the
    same weights, nf4 its quantization of them; nothing is left uninitialised (q/k/v biases, norms, RoPE)."""
    import bitsandbytes.functional as F

    folder = shrunk("qwen2.5-0.5b", tmp_path / "small", vocab=1024)
    dtype = torch.bfloat16
    bf16 = load_model(str(folder), CPU, dtype)
    again = load_model(str(folder), CPU, dtype)
    nf4 = load_model(str(folder), CPU, dtype, QUANT.get("nf4").hf_quantization_config(dtype))
    assert getattr(nf4, "is_loaded_in_4bit", False) and not bf16.training
    plain = dict(bf16.named_parameters())
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in plain.items())
    for name, p in nf4.named_parameters():
        if type(p).__name__ == "Params4bit":
            w = F.dequantize_4bit(p.data, p.quant_state).float()
            assert (w - plain[name].float()).norm() / plain[name].float().norm() < 0.15, name  # NF4's own error
        else:
            assert torch.equal(p, plain[name]), name
    layer = bf16.model.layers[0]
    assert torch.all(layer.self_attn.q_proj.bias == 0) and torch.all(layer.input_layernorm.weight == 1)
    assert torch.all(bf16.model.embed_tokens.weight[bf16.config.pad_token_id] == 0)
    assert 0.015 < layer.mlp.down_proj.weight.float().std() < 0.025  # initializer_range 0.02
    ids = torch.tensor([[5, 20, 21, 14, 22, 23, 32]])
    with torch.no_grad():
        assert torch.isfinite(bf16(input_ids=ids).logits).all() and torch.isfinite(nf4.train()(input_ids=ids).logits).all()


def test_vllm_gets_a_checkpoint_of_the_same_weights_written_once(tmp_path):
    """vLLM reads files: loading.checkpoint writes the shape's weights as the trainer draws them on this device kind."""
    from transformers import AutoModelForCausalLM

    from harness.models.loading import checkpoint

    folder = shrunk("qwen2.5-0.5b", tmp_path / "small", vocab=1024)
    assert checkpoint("/no/such/model", CPU, torch.bfloat16) == "/no/such/model"  # anything else is left as it is
    saved = Path(checkpoint(str(folder), CPU, torch.bfloat16))
    assert saved == folder / "weights-cpu-bfloat16" and (saved / "tokenizer.json").exists()
    assert checkpoint(str(folder), CPU, torch.bfloat16) == str(saved)  # once
    read = dict(AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16).named_parameters())
    made = dict(load_model(str(folder), CPU, torch.bfloat16).named_parameters())
    assert read.keys() == made.keys() and all(torch.equal(read[n], p) for n, p in made.items())


def test_nf4_keeps_everything_but_its_linears_in_the_compute_dtype_and_lora_trains(tmp_path):
    """peft's prepare_model_for_kbit_training cast embeddings, norms and lm_head to float32, and with them every
    hidden state and the logits; now only the adapters are float32 and the activations stay bf16."""
    folder = shrunk("qwen2.5-0.5b", tmp_path / "small", vocab=1024)
    cfg = RunConfig(model=str(folder), quant="nf4")
    model, _ = load_policy(cfg, CPU, torch.bfloat16)
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    packed = {n for n, p in base.items() if type(p).__name__ == "Params4bit"}
    assert len(packed) == 2 * 7 and all(not p.requires_grad for p in base.values())
    assert {p.dtype for n, p in base.items() if n not in packed} == {torch.bfloat16}  # embeddings, norms, biases, lm_head
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    seen = {}

    def hidden_dtype(module, args, out):
        seen["hidden"] = (out[0] if isinstance(out, tuple) else out).dtype

    model.get_base_model().model.layers[0].register_forward_hook(hidden_dtype)
    model.train()
    out = model(input_ids=torch.tensor([[5, 20, 21, 14, 22, 23, 32]] * 2), labels=torch.tensor([[5, 20, 21, 14, 22, 23, 32]] * 2))
    assert seen["hidden"] == torch.bfloat16 and out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in lora.items() if "lora_B" in n]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def write_matrix(tmp_path: Path, model: str, steps: int = 2) -> Path:
    (tmp_path / "shapes.yaml").write_text(
        f"base:\n  model: {model}\n  task: {{name: arith, eval_size: 4}}\n  rollout: {{max_new_tokens: 3}}\n"
        f"  lora: {{r: 4, alpha: 8}}\n"
        f"  train: {{steps: {steps}, prompts_per_step: 2, group_size: 2, eval_every: {steps}, checkpoint_every: {steps}}}\n"
        "axes: {quant: [bf16, nf4]}\nseeds: [0]\nbaseline: {quant: bf16}\n")
    return tmp_path / "shapes.yaml"


def check_not_judged(result, model: str) -> None:
    assert result.statuses == {"ok": 2}, result.statuses
    assert [v.status for v in result.verdicts] == [NOT_JUDGED] * 2
    assert all(r.verdict == "not_judged" for v in result.verdicts for r in v.runs)
    assert all(v.delta_vs_baseline is None for v in result.verdicts)  # no Δ of random weights' rewards
    env = json.loads((result.plan.jobs[0].run_dir / "env.json").read_text())
    assert env["model"]["random_weights"] is True and env["model"]["name"] == model
    report = result.report.read_text()
    assert f"🎲 **{NOT_JUDGED}**" in report and "random weights" in report.split("## Environment")[1]
    assert "placeholders to" in report.split("## Environment")[1]
    assert NOT_JUDGED in (result.report.parent / "report.html").read_text()


def test_runs_of_a_shape_are_recorded_as_random_weights_and_not_judged(tmp_path):
    import harness

    folder = shrunk("qwen2.5-0.5b", tmp_path / "small", vocab=1024)
    result = harness.sweep(write_matrix(tmp_path, str(folder)), results=tmp_path / "results", reports=tmp_path / "reports",
                           executor=harness.settings("sequential", device="cpu"))
    check_not_judged(result, str(folder))


@pytest.mark.slow
def test_a_real_shape_trains_on_cpu_and_is_not_judged(tmp_path):
    """shape:qwen2.5-0.5b itself, 494M parameters at its real 151936-id vocabulary, one step in bf16 and in nf4: a few
    minutes on a 2-core CPU (the nf4 cell quantizes 360M weights on the CPU; lm_head's backward at this vocabulary is slow
    there, see the report of issue 22)."""
    import harness

    result = harness.sweep(write_matrix(tmp_path, "shape:qwen2.5-0.5b", steps=1), results=tmp_path / "results",
                           reports=tmp_path / "reports", executor=harness.settings("sequential", device="cpu"))
    check_not_judged(result, "shape:qwen2.5-0.5b")


def test_memory_fit_estimates_a_shape_with_bf16_activations_under_nf4():
    """The estimate models the fixed nf4 load: its activations and logits are bf16's, only its weights are smaller; a
    GPU's estimate can be asked for on a machine without one (`harness memory-fit --device cuda`)."""
    from typer.testing import CliRunner

    from harness.cli import app
    from harness.execution.memory_fit import estimate

    est = {q: estimate(RunConfig(model="shape:qwen2.5-1.5b", quant=q, train={"dtype": "bfloat16"}), torch.device("cuda"))
           for q in ("bf16", "nf4")}
    assert est["bf16"]["shapes"]["vocab"] == 151936 and est["nf4"]["shapes"]["activation_bytes"] == 2
    for part in ("activations", "logits", "kv_cache", "rollout_logits"):
        assert est["nf4"]["parts"][part] == est["bf16"]["parts"][part], part
    assert est["nf4"]["parts"]["base_weights"] < 0.4 * est["bf16"]["parts"]["base_weights"]
    out = CliRunner().invoke(app, ["memory-fit", "--set", "model=shape:qwen2.5-1.5b", "--set", "quant=nf4", "--device", "cuda"])
    assert out.exit_code == 0, out.output
    assert f"peak {est['nf4']['peak_gib']:.2f} GiB" in out.output and "base_weights" in out.output
    bad = CliRunner().invoke(app, ["memory-fit", "--set", "model=shape:qwen2.5-1.5"])
    assert bad.exit_code == 2 and "did you mean 'qwen2.5-1.5b'" in bad.output


def test_memory_fit_takes_the_gpus_size_that_vllms_share_is_of():
    """`--gpu-gib` sets the total that gpu_memory_utilization is a share of (an H200's estimate on a machine without
    one); without it, an H100's is assumed and said."""
    from typer.testing import CliRunner

    from harness.cli import app
    from harness.execution.memory_fit import ASSUMED_GPU_GIB

    args = ["memory-fit", "--set", "model=shape:qwen2.5-1.5b", "--set", "rollout.colocation=colocated", "--device", "cuda"]
    h200, h100 = CliRunner().invoke(app, [*args, "--gpu-gib", "140.4"]), CliRunner().invoke(app, args)
    assert h200.exit_code == 0 and h100.exit_code == 0, h200.output + h100.output
    def vllm_part(output: str) -> str:
        return next(line.split("│")[2].strip() for line in output.splitlines() if line.startswith("│ vllm "))

    assert vllm_part(h200.output) == f"{0.3 * 140.4:.3f}" and "taken of an H100" not in h200.output
    assert vllm_part(h100.output) == f"{0.3 * ASSUMED_GPU_GIB:.3f}" and "taken of an H100" in h100.output
