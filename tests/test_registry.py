"""Typed registries: a target is checked against its registry's base when loaded; names and aliases
resolve; every registered name loads and satisfies its type; engines and formats satisfy their Protocols."""

import subprocess
import sys
import types

import pytest

from harness import registries
from harness.execution import Executor
from harness.quant.base import QuantFormat
from harness.recipes import Recipe
from harness.registry import Choices, Names, Registry, UnknownName, mismatch, protocol_members
from harness.rollout.base import RolloutEngine

from conftest import REPO

ALL = {name: reg for name, reg in vars(registries).items() if isinstance(reg, Names)}
TYPED = {name: reg for name, reg in ALL.items() if isinstance(reg, Registry)}


@pytest.fixture
def fake_module(monkeypatch):
    """A module `fake_targets` holding the objects a test registers, importable by name."""
    module = types.ModuleType("fake_targets")
    monkeypatch.setitem(sys.modules, "fake_targets", module)
    return module


def recipe(cfg, run_dir, tracker, device, progress=lambda **kw: None) -> dict:
    return {}


def two_argument_recipe(cfg, run_dir) -> dict:
    return {}


class NotAnEngine:  # an engine with sync and generate only
    facts: dict
    sleeps = False

    def sync(self) -> None: ...

    def generate(self, prompts, greedy=False): ...


def test_a_function_of_the_wrong_signature_is_refused_naming_registry_name_and_target(fake_module):
    fake_module.run, fake_module.short = recipe, two_argument_recipe
    reg: Registry[Recipe] = Registry("algorithm", Recipe)
    reg.register("good", "fake_targets:run")
    reg.register("short", "fake_targets:short")
    assert reg.get("good") is recipe
    with pytest.raises(TypeError) as err:
        reg.get("short")
    msg = str(err.value)
    assert "algorithm registry" in msg and "'short'" in msg and "fake_targets:short" in msg
    assert "Recipe(cfg, run_dir, tracker, device, progress)" in msg


def test_a_class_lacking_protocol_members_is_refused(fake_module):
    fake_module.Engine = NotAnEngine
    reg: Registry[type[RolloutEngine]] = Registry("rollout engine", RolloutEngine)
    reg.register("half", "fake_targets:Engine")
    with pytest.raises(TypeError) as err:
        reg.get("half")
    msg = str(err.value)
    assert "rollout engine registry: 'half' -> fake_targets:Engine" in msg
    assert "lacks close, eval_batch, mark_synced, pop_metrics, release" in msg


def test_an_instance_that_is_not_a_format_is_refused(fake_module):
    fake_module.BF16 = types.SimpleNamespace(name="bf16", kind=None, load_base=lambda *a: None)  # most members missing
    reg: Registry[QuantFormat] = Registry("quant format", QuantFormat)
    reg.register("bf16", "fake_targets:BF16")
    with pytest.raises(TypeError, match=r"quant format registry: 'bf16' -> fake_targets:BF16 .*lacks calibrated, double_quant"):
        reg.get("bf16")


def test_a_plain_base_class_is_checked_with_isinstance_and_issubclass(fake_module):
    fake_module.number, fake_module.text, fake_module.Flag, fake_module.Text = 3, "three", bool, str
    values: Registry[int] = Registry("number", int)
    values.register("number", "fake_targets:number")
    values.register("text", "fake_targets:text")
    assert values.get("number") == 3
    with pytest.raises(TypeError, match="'text' -> fake_targets:text is a str, not an instance of class builtins.int"):
        values.get("text")
    classes: Registry[type[int]] = Registry("int class", int)
    classes.register("flag", "fake_targets:Flag")
    classes.register("text", "fake_targets:Text")
    assert classes.get("flag") is bool
    with pytest.raises(TypeError, match="is not a subclass of class builtins.int"):
        classes.get("text")


def test_a_target_replaced_after_its_check_is_checked_again(fake_module):
    fake_module.run = recipe
    reg: Registry[Recipe] = Registry("algorithm", Recipe)
    reg.register("grpo", "fake_targets:run")
    reg.get("grpo")
    fake_module.run = two_argument_recipe
    with pytest.raises(TypeError):
        reg.get("grpo")


def test_names_and_aliases_resolve(fake_module):
    fake_module.run = recipe
    reg: Registry[Recipe] = Registry("algorithm", Recipe)
    reg.register("grpo", "fake_targets:run", "group-relative", aliases=("GRPO", "group"))
    assert reg.names() == ["grpo"]
    assert reg.canonical("grpo") == reg.canonical("GRPO") == reg.canonical("group") == "grpo"
    assert reg.get("group") is reg.get("grpo") is recipe
    assert reg.describe("GRPO") == "group-relative"
    assert reg.target("group") == "fake_targets:run" and reg.module("grpo") == "fake_targets"
    with pytest.raises(UnknownName, match=r"unknown algorithm 'grpp'; did you mean 'grpo'\? Valid: grpo"):
        reg.canonical("grpp")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("group", "fake_targets:run")
    with pytest.raises(ValueError, match="not 'module:attribute'"):
        reg.register("rloo", "fake_targets.run")


def test_registering_and_naming_import_nothing():
    reg: Registry[Recipe] = Registry("algorithm", Recipe)
    reg.register("lazy", "a_module_that_is_not_there:run")
    assert reg.canonical("lazy") == "lazy" and reg.module("lazy") == "a_module_that_is_not_there"
    with pytest.raises(ModuleNotFoundError):
        reg.get("lazy")


def test_choices_carry_plain_values():
    modes: Choices[str] = Choices("mode")
    modes.register("a", "hf", "the first", aliases=("A",))
    assert modes.value("A") == "hf" and modes.describe("a") == "the first"
    with pytest.raises(UnknownName):
        modes.value("b")


@pytest.mark.parametrize(("registry", "name"), [(r, n) for r, reg in TYPED.items() for n in reg.names()])
def test_every_registered_name_loads_and_satisfies_its_type(registry, name):
    reg = TYPED[registry]
    target = reg.get(name)  # raises TypeError on a mismatch
    assert mismatch(target, reg.base) is None


def test_every_axis_is_a_typed_registry_or_plain_choices():
    assert set(ALL) == {"QUANT", "ALGORITHMS", "TASKS", "MODELS", "SHAPES", "ROLLOUT_ENGINES", "COLOCATION", "EXECUTORS"}
    assert set(ALL) - set(TYPED) == {"COLOCATION", "SHAPES"}
    assert registries.EXECUTORS.base is Executor


def test_each_colocation_mode_names_the_engine_that_runs_it():
    from harness.config.run import RolloutConfig

    for mode in registries.COLOCATION.names():
        engine = registries.COLOCATION.value(mode)
        assert registries.ROLLOUT_ENGINES.canonical(engine) == engine
        assert RolloutConfig(colocation=mode).engine == engine
    assert [registries.COLOCATION.value(m) for m in ("in_process", "colocated", "server")] == ["hf", "vllm", "vllm"]


def test_engine_classes_satisfy_the_engine_protocol():
    from harness.config.run import RunConfig
    from harness.rollout.hf import HFEngine
    from harness.rollout.vllm import VLLMEngine

    assert protocol_members(RolloutEngine) == ["close", "eval_batch", "facts", "generate", "mark_synced", "pop_metrics",
                                               "release", "sleeps", "sync"]
    for cls in (HFEngine, VLLMEngine):
        assert mismatch(cls, RolloutEngine) is None, cls
    assert isinstance(HFEngine(None, None, RunConfig()), RolloutEngine)


def test_quant_format_classes_and_instances_satisfy_the_format_protocol():
    from harness.quant import bnb, modelopt

    for cls in (bnb.BnbFormat, modelopt.ModelOptFormat):
        assert mismatch(cls, QuantFormat) is None, cls
    for name in registries.QUANT.names():
        fmt = registries.QUANT.get(name)
        assert isinstance(fmt, QuantFormat) and fmt.name == name
        assert fmt.fake_quant == fmt.calibrated == (registries.QUANT.module(name) == "harness.quant.modelopt")
        assert fmt.kind in (None, "int8", "nf4", "fp4") and (fmt.kind is None or not fmt.fake_quant)
        if not fmt.fake_quant:
            assert fmt.resolve_config(None, None) is None


def test_the_registries_and_run_config_import_no_heavy_library():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import harness.registries, harness.config.run"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "harness" in imported and not imported & {"torch", "transformers", "vllm", "bitsandbytes", "modelopt"}
