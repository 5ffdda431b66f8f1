"""`shape:<name>` (registries.SHAPES): a released model's architecture with random weights, for throughput and
memory at real sizes with nothing downloaded. These runs say nothing about convergence: their cells read
"Not judged (random weights)" (results.verdict).

Each shape is the published config.json of its model (harness/models/shapes/<name>.json): every dimension,
the vocabulary size and the embedding tying as released. Its folder in the cache (`folder`) holds that
config, a tokenizer and shape.json, and no weights: a 7B checkpoint would be 15 GB on disk. The weights are
made where the run loads them (`load`): the model is built on the meta device, bitsandbytes formats swap in
their quantized linears there (as `from_pretrained` does), and then each tensor is made on the run's device:
linear and embedding weights drawn as the model's `_init_weights` draws them (normal, std initializer_range),
each from a generator seeded by the shape's seed and the tensor's name, so every format (and a distill
teacher) starts from the same weights whatever the order they are made in; a weight to quantize is
quantized as soon as it is drawn, by the quantizer's own op, so device memory holds the 4- or 8-bit base
and one layer's weight at a time, never a bf16 copy of the model; norms, biases and RoPE buffers then come
from the model's own `initialize_weights`.

vLLM reads weights from files, so a vLLM rollout engine gets a checkpoint (`weights`): the same weights,
drawn on the same kind of device, written once beside the folder (15 GB for a 7B model in bf16), from which
vLLM quantizes as it would a released checkpoint.

The tokenizer is the tiny model's character tokenizer (tiny_arith.make_tokenizer) padded with placeholder
tokens to the real vocabulary's size: the embedding, lm_head and the logits over the vocabulary (what
dominates memory at small batch) keep their real shapes, and every id the random policy samples decodes.
Placeholders are spelled in letters (`<|bcd|>`), so no answer parser reads a number out of one. The
config's bos/eos/pad ids are the tokenizer's (they change no shape).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from harness.common.files import locked, replacing
from harness.models.tiny_arith import cache_root

SHAPES_DIR = Path(__file__).parent / "shapes"
SEED = 0  # the weights' seed: one set of random weights per shape (and device kind)
VERSION = 1  # of the folder's recipe: bump when what `folder` writes changes


def spec(name: str) -> dict:
    """The shipped shapes/<name>.json: {"config_of": HF id, "source": where its values come from, "config": config.json}."""
    from harness.registries import SHAPES

    return json.loads((SHAPES_DIR / f"{SHAPES.canonical(name)}.json").read_text())


def tokenizer_note(vocab_size: int) -> str:
    return f"tiny + placeholders to {vocab_size} ids (the real vocab's size, not its tokens)"


def folder(name: str) -> Path:
    """The shape's model folder (config, tokenizer, shape.json; no weights), made once in the cache."""
    from harness.registries import SHAPES

    name = SHAPES.canonical(name)
    recipe = {"spec": spec(name), "seed": SEED, "version": VERSION}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"shape-{name}-{key}"
    if (target / "shape.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.parent / f"{target.name}.lock"):  # a concurrent build waits and then reuses ours
        if not (target / "shape.json").exists():
            with replacing(target) as tmp:
                _write(tmp, name, recipe["spec"])
                shutil.rmtree(target, ignore_errors=True)  # a folder without its shape.json: torn
    return target


def _write(out: Path, name: str, shape: dict) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tokenizer = make_tokenizer(shape["config"]["vocab_size"])
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    config = AutoConfig.for_model(**(shape["config"] | ids))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    GenerationConfig(pad_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"], do_sample=False).save_pretrained(out)
    tokenizer.save_pretrained(out)
    facts = {"shape": name, "config_of": shape["config_of"], "random_weights": True, "seed": SEED,
             "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
             "tokenizer": tokenizer_note(config.vocab_size)}
    (out / "shape.json").write_text(json.dumps(facts, indent=2))


def make_tokenizer(vocab_size: int):
    """The tiny character tokenizer with placeholder tokens after its own, `vocab_size` ids in all."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from harness.models.tiny_arith import make_tokenizer as tiny

    state = json.loads(tiny().backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    vocab |= {placeholder(i): i for i in range(len(vocab), vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                   pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def placeholder(i: int) -> str:
    """Token `i`'s placeholder: `<|` + i in base 26, written with the letters a-z + `|>`."""
    letters = ""
    while True:
        i, r = divmod(i, 26)
        letters = chr(ord("a") + r) + letters
        if i == 0:
            return f"<|{letters}|>"


def is_shape(source: str | Path) -> bool:
    """Whether `source` (what loading.resolve gave) is a shape's folder, whose weights are made, not read."""
    return (Path(source) / "shape.json").is_file()


def facts(source: str | Path) -> dict:
    """What a run records about its shape (env.json's model): random_weights, the shape, its parameters, the tokenizer."""
    return json.loads((Path(source) / "shape.json").read_text())


def weights(source: str | Path, device: torch.device, dtype: torch.dtype) -> Path:
    """A checkpoint of the shape's random weights as `load` makes them on a `device` of this type in `dtype`
    (for vLLM, which reads files), written once into the shape's folder: `weights-<device type>-<dtype>/`."""
    source, device = Path(source), torch.device(device)
    target = source / f"weights-{device.type}-{str(dtype).removeprefix('torch.')}"
    if (target / "config.json").exists():
        return target
    with locked(source / f"{target.name}.lock"):
        if not (target / "config.json").exists():
            with replacing(target) as tmp:
                model = load(source, torch.device("cpu"), dtype, draw_on=device)
                model.save_pretrained(tmp)  # safetensors; the folder appears whole (replacing)
                for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                    shutil.copy(source / name, tmp / name)
                del model
                shutil.rmtree(target, ignore_errors=True)  # a folder without its config.json: torn
    return target


def load(source: str | Path, device: torch.device, dtype: torch.dtype, quantization_config=None,
         draw_on: torch.device | None = None):
    """The shape's model on `device` with random weights in `dtype`, quantized at load as `quantization_config`
    (a transformers BitsAndBytesConfig, or None) says: what `from_pretrained` would give for a checkpoint of
    these weights, in eval mode, with the folder's generation config. `draw_on`: the device whose generators
    draw the weights (default `device`); the same kind of device draws the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    source = Path(source)
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantizer = None
    if quantization_config is not None:
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": device})  # bnb linears, on meta
    _materialize(model, torch.device(device), dtype, quantizer, facts(source)["seed"], torch.device(draw_on or device))
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)  # is_loaded_in_4bit / 8bit, config.quantization_config
    model.config.name_or_path = str(source)
    model.generation_config = GenerationConfig.from_pretrained(source)
    return model.eval()


@torch.no_grad()
def _materialize(model, device: torch.device, dtype: torch.dtype, quantizer, seed: int, draw_on: torch.device) -> None:
    std = getattr(model.config.get_text_config(), "initializer_range", None) or 0.02
    drawn = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    fp32 = [*(getattr(model, "_keep_in_fp32_modules_strict", None) or []),  # as from_pretrained's dtype plan
            *((getattr(model, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else [])]
    for name, param in list(model.named_parameters()):  # tied weights once: tie_weights() below re-ties them
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        # the dtype from_pretrained loads a checkpoint's tensor in (the quantizer's modules were made outside
        # from_config's dtype, in the default one)
        like = torch.float32 if any(m in name for m in fp32) else dtype if param.is_floating_point() else param.dtype
        if id(param) not in drawn:  # norms, biases: the model's own init below
            new = torch.nn.Parameter(torch.empty(param.shape, dtype=like, device=device), requires_grad=param.requires_grad)
        else:
            quantize = quantizer is not None and quantizer.param_needs_quantization(model, name)
            value = torch.empty(param.shape, dtype=like, device=draw_on)
            value.normal_(0.0, std, generator=torch.Generator(draw_on).manual_seed(_seed(seed, name)))
            value = value.to(device)
            if getattr(module, "padding_idx", None) is not None:
                value[module.padding_idx] = 0  # as _init_weights leaves an embedding's padding row
            if quantize:  # what from_pretrained does with a checkpoint's tensor
                new = quantizer.get_quantize_ops().convert({name: value}, model=model, full_layer_name=name)[name]
                module._is_hf_initialized = False  # the op marks the whole module loaded: its bias is not
            else:
                new = torch.nn.Parameter(value, requires_grad=param.requires_grad)
            new._is_hf_initialized = True  # initialize_weights leaves it as drawn
        module._parameters[attr] = new
    for name, buffer in list(model.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._buffers[attr] = torch.empty_like(buffer, device=device)
    model.initialize_weights()  # norms to one, biases to zero, RoPE's inverse frequencies
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"shape model: tensors left on the meta device: {left[:5]}")


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1
