"""The W&B mirror against real wandb, offline: what it writes is read back from the .wandb transaction
logs (decoded with wandb's own protobuf Record), not taken on trust from wandb's Python objects."""

import json
import math
import sys
from pathlib import Path

import pytest

from harness.tracking.wandb import WandbSettings, WandbTracker, read_records, record_verdicts, require_wandb

from conftest import tiny_run_config

wandb = pytest.importorskip("wandb")

GROUP, TAGS = "smoke", ["quant=nf4", "lora.r=8"]


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """No network, no login, nothing written outside tmp_path; wandb's service is shut down after
    each test so the next one reads these variables afresh."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("DIR", "CACHE_DIR", "DATA_DIR", "CONFIG_DIR", "ARTIFACT_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")  # no system-metrics sampler: faster, and fewer records
    yield
    wandb.teardown()


def new_run(tmp_path: Path) -> tuple[Path, dict]:
    cfg = tiny_run_config()
    (run_dir := tmp_path / "results" / GROUP / cfg.run_id).mkdir(parents=True)  # as run_one makes it first
    return run_dir, cfg.model_dump(mode="json")


def tracker(run_dir: Path, config: dict) -> WandbTracker:
    return WandbTracker(run_dir, config, WandbSettings(), group=GROUP, name=f"{TAGS[0]} seed=0", tags=TAGS)


def fragments(run_dir: Path) -> list[dict]:
    """Each offline-run-* folder's transaction log, oldest first, as run record, config, history
    rows by step, summary updates and exit code."""
    # workaround(wandb 0.31): run.finish() returns before wandb's core has written the log's tail; teardown waits for it
    wandb.teardown()
    out = []
    for path in run_dir.glob("wandb/offline-run-*/run-*.wandb"):
        f = {"path": path, "config": {}, "history": {}, "summary": {}, "exit": None}
        for r in read_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                f["run"] = r.run
                f["config"] |= {i.key: json.loads(i.value_json) for i in r.run.config.update}
            elif kind == "config":
                f["config"] |= {i.key: json.loads(i.value_json) for i in r.config.update}
            elif kind == "history":
                f["history"][r.history.step.num] = {_key(i): json.loads(i.value_json) for i in r.history.item}
            elif kind == "summary":
                f["summary"] |= {_key(i): json.loads(i.value_json) for i in r.summary.update}
            elif kind == "exit":
                f["exit"] = r.exit.exit_code
        out.append(f)
    return sorted(out, key=lambda f: f["run"].start_time.ToNanoseconds())


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # "reward/mean" comes back as one nested key part


def logged(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}  # without wandb's _step, _runtime, _timestamp


def test_mirrors_metrics_config_samples_and_summary(tmp_path, capfd):
    run_dir, config = new_run(tmp_path)
    t = tracker(run_dir, config)
    t.log_config(config)
    t.log({"eval/reward": 0.25}, step=0)
    t.log({"reward/mean": 0.5, "kl": 0.01}, step=1)
    t.log({"reward/mean": 0.75, "kl": float("nan"), "eval/reward": 0.5}, step=2)  # NonFinite logs its NaN row
    samples = [{"prompt": "1+2=", "completion": "3", "reward": 1.0}, {"prompt": "2+2=", "completion": "5", "reward": 0.0}]
    t.log_samples(samples, step=2)
    t.log({"reward/mean": 9.0}, step=1)  # below the last step: wandb would drop it with a warning; skipped
    t.finish({"run_id": run_dir.name, "status": "ok", "error": None, "eval_end": 0.5, "wall_s": 1.5, "lm_eval": {"acc": 0.1}})

    out, err = capfd.readouterr()
    assert "wandb" not in (out + err).lower()  # no banners, no warnings in the sweep's console

    [f] = fragments(run_dir)
    assert f["path"].parent.parent == run_dir / "wandb"
    run = f["run"]
    assert (run.run_id, run.project, run.run_group, list(run.tags)) == (run_dir.name, GROUP, GROUP, TAGS)
    assert run.display_name == "quant=nf4 seed=0"
    assert {k: f["config"][k] for k in config} == config  # every RunConfig field, nested ones whole

    h = f["history"]
    assert sorted(h) == [0, 1, 2]
    assert logged(h[0]) == {"eval/reward": 0.25}
    assert logged(h[1]) == {"reward/mean": 0.5, "kl": 0.01}
    assert h[2]["reward/mean"] == 0.75 and h[2]["eval/reward"] == 0.5 and math.isnan(h[2]["kl"])
    assert h[2]["samples/_type"] == "table-file" and h[2]["samples/nrows"] == 2  # the samples table, same step
    table = json.loads((f["path"].parent / "files" / h[2]["samples/path"]).read_text())
    assert table["columns"] == ["step", "prompt", "completion", "reward"]
    assert table["data"] == [[2, "1+2=", "3", 1.0], [2, "2+2=", "5", 0.0]]

    s = f["summary"]
    assert (s["status"], s["error"], s["eval_end"], s["wall_s"], s["run_id"]) == ("ok", None, 0.5, 1.5, run_dir.name)
    assert "lm_eval" not in s  # scalars only
    assert f["exit"] == 0


def test_resumed_run_skips_steps_wandb_has_and_appends_the_rest(tmp_path, capfd):
    run_dir, config = new_run(tmp_path)
    first = tracker(run_dir, config)
    for step in range(4):
        first.log({"reward/mean": step / 10}, step)
    first.finish({"status": "failed", "error": "killed"})

    # the harness resumes from its step-2 checkpoint: it replays step 3, then goes on
    second = tracker(run_dir, config)
    second.log({"reward/mean": 0.99}, step=3)
    second.log({"reward/mean": 0.4}, step=4)
    second.finish({"status": "ok", "error": None})

    assert "wandb" not in "".join(capfd.readouterr()).lower()  # wandb's "steps must be monotonic" warning included
    a, b = fragments(run_dir)
    assert a["run"].run_id == b["run"].run_id == run_dir.name
    assert b["run"].resume  # what `wandb sync` reads to resume the run instead of starting it again
    assert {s: logged(r) for s, r in a["history"].items()} == {s: {"reward/mean": s / 10} for s in range(4)}
    assert {s: logged(r) for s, r in b["history"].items()} == {4: {"reward/mean": 0.4}}  # step 3 keeps its first value
    assert (a["exit"], b["exit"]) == (1, 0)
    assert b["summary"]["status"] == "ok"


def test_record_verdicts_resumes_each_mirrored_run(tmp_path):
    run_dir, config = new_run(tmp_path)
    t = tracker(run_dir, config)
    t.log({"reward/mean": 0.5}, step=1)
    t.finish({"status": "ok"})
    (run_dir / "summary.json").write_text(json.dumps({"status": "ok"}))
    never_mirrored = tmp_path / "results" / GROUP / "0123456789ab"
    never_mirrored.mkdir()

    verdict = {"verdict/run": "converged", "verdict/cell": "Converges"}
    record_verdicts({run_dir: verdict, never_mirrored: verdict}, WandbSettings(), GROUP)

    trained, judged = fragments(run_dir)
    assert judged["run"].run_id == trained["run"].run_id and judged["run"].resume
    assert judged["run"].run_group == GROUP and judged["run"].project == GROUP
    assert {k: judged["summary"][k] for k in verdict} == verdict
    assert judged["history"] == {} and judged["exit"] == 0  # the run stays "finished", not failed
    assert not (never_mirrored / "wandb").exists()


def test_wandb_failures_warn_once_and_never_reach_the_run(tmp_path, monkeypatch, capsys):
    run_dir, config = new_run(tmp_path)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(wandb, "init", boom)
        t = tracker(run_dir, config)
        t.log_config(config)
        t.log({"reward/mean": 0.5}, step=1)
        t.log_samples([{"prompt": "p", "completion": "c", "reward": 1.0}], step=1)
        t.finish({"status": "ok"})
        record_verdicts({run_dir: {"verdict/run": "converged"}}, WandbSettings(), GROUP)  # no wandb/ here: skipped
    assert capsys.readouterr().err.count("W&B mirror off") == 1

    t = tracker(run_dir, config)  # wandb breaks mid-run this time
    monkeypatch.setattr(t._run, "log", boom)
    t.log({"reward/mean": 0.5}, step=1)
    t.log({"reward/mean": 0.6}, step=2)
    t.finish({"status": "ok"})
    err = capsys.readouterr().err
    assert err.count("W&B mirror off") == 1 and "RuntimeError: boom" in err

    (other := run_dir.parent / "0123456789ab" / "wandb").mkdir(parents=True)
    with monkeypatch.context() as m:
        m.setattr(wandb, "init", boom)
        record_verdicts({run_dir: {"verdict/run": "a"}, other.parent: {"verdict/run": "b"}}, WandbSettings(), GROUP)
    assert capsys.readouterr().err.count("W&B verdicts not recorded") == 1  # once, then it stops trying


def test_read_records_spans_blocks_and_stops_at_a_torn_tail(tmp_path):
    run_dir, config = new_run(tmp_path)
    t = tracker(run_dir, config)
    t.log({"reward/mean": 0.5}, step=1)
    t.finish({"status": "failed", "traceback": "x" * 100_000})  # one record over several 32 KiB blocks
    [f] = fragments(run_dir)
    assert f["summary"]["traceback"] == "x" * 100_000 and f["exit"] == 1
    whole = list(read_records(f["path"]))
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(f["path"].read_bytes()[:-3])  # a killed run's last write, cut short
    assert [r.SerializeToString() for r in read_records(torn)] == [r.SerializeToString() for r in whole[:-1]]


def test_require_wandb_says_how_to_install(monkeypatch):
    require_wandb()
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'quant-rl-harness\[wandb\]'"):
        require_wandb()
