"""lm-evaluation-harness on a trained run (real lm-eval, the real tiny model, CPU): the harness's own
qrl_arith task scores the run's held-out set as the run's eval/reward does."""

import math
import socket

import pytest
import torch

from harness.evals.lm_eval import LmEvalSettings, evaluate_run

from conftest import tiny_run_config

CPU = torch.device("cpu")
EVAL_SIZE = 200


def arith_config(quant: str):
    from harness.config.run import RunConfig

    return RunConfig.model_validate(tiny_run_config().model_dump()
                                    | {"quant": quant, "task": {"name": "arith", "eval_size": EVAL_SIZE}})


def test_lm_eval_exact_match_is_the_nf4_runs_eval_reward(tiny_model, tmp_path, monkeypatch):
    """The quantized (NF4) final policy under lm-eval scores the run's held-out set as the run's own
    last eval/reward did (greedy both sides: expected equal); bf16_base adds the unquantized base.
    Run the way a sweep runs it: `eval.lm_eval` reaches run_one as an option, the scores land in summary.json."""
    from harness.execution.jobs import RunOptions
    from harness.execution.lifecycle import run_one
    from harness.results.layout import read_json, read_metrics

    cfg, run_dir = arith_config("nf4"), tmp_path / "run"
    attempts = []

    def no_network(sock, address, *args):
        attempts.append(address)
        raise OSError("the harness's lm-eval tasks must not need the network")

    with monkeypatch.context() as m:
        m.setattr(socket.socket, "connect", no_network)
        settings = LmEvalSettings(tasks=("qrl_arith",), bf16_base=True)
        summary = run_one(cfg, run_dir, CPU, options=RunOptions(lm_eval=settings.model_dump(mode="json")))
    assert attempts == []
    assert summary["status"] == "ok", summary["error"]
    final = [row for row in read_metrics(run_dir) if "eval/reward" in row][-1]
    assert final["step"] == cfg.train.steps
    out = read_json(run_dir / "summary.json")["lm_eval"]
    assert "error" not in out, out
    got = out["quantized"]["qrl_arith"]
    assert got["n"] == EVAL_SIZE and out["quant"] == "nf4" and out["lm_eval_version"]
    p = final["eval/reward"]
    se = math.sqrt(max(p * (1 - p), 1 / EVAL_SIZE) / EVAL_SIZE)
    diff = got["exact_match"] - p
    print(f"\nnf4: harness eval/reward {p:.4f}, lm-eval exact_match {got['exact_match']:.4f} "
          f"(diff {diff:+.4f}, 3 SE {3 * se:.4f}), lm-eval stderr {got['exact_match_stderr']:.4f}")
    assert abs(diff) <= 3 * se

    bf16 = out["bf16"]["qrl_arith"]  # the same adapter on the unquantized base
    assert bf16["n"] == EVAL_SIZE and 0 <= bf16["exact_match"] <= 1
    print(f"nf4 adapter on the bf16 base: exact_match {bf16['exact_match']:.4f}")
    assert sorted(f.name for f in (run_dir / "lm_eval").iterdir()) == ["data", "hf_datasets", "tasks"]
    assert_final_policy_is_nf4_with_the_trained_adapter(cfg, run_dir)


def assert_final_policy_is_nf4_with_the_trained_adapter(cfg, run_dir):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from harness.evals.lm_eval import _load_final_policy
    from harness.quant.bnb import quantized_linear_stats

    model, _ = _load_final_policy(cfg, run_dir, CPU)
    assert quantized_linear_stats(model)["quantized_linear_params"] > 0
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_harness_lm_generates_as_the_engine_decodes(tiny_model):
    """No BOS, and special tokens other than eos stay visible: decode_completions keeps a `<pad>`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.evals.lm_eval import _harness_lm

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lm = _harness_lm(AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer, batch_size=4)
    ids = tokenizer.encode("12", add_special_tokens=False) + [tokenizer.pad_token_id, tokenizer.eos_token_id]
    assert lm.tok_decode(ids) == "12<pad><eos>"
    assert lm.add_bos_token is False


def test_boxed_scoring_is_the_tasks_reward():
    from harness.evals.lm_eval_tasks.utils import process_results_arith, process_results_boxed

    doc = {"prompt": "q\nPut the final answer in \\boxed{}.\n", "answer": "1200"}
    assert process_results_boxed(doc, ["so \\boxed{1,200}."]) == {"exact_match": 1.0}
    assert process_results_boxed(doc, ["\\boxed{12} then \\boxed{1200.0}"]) == {"exact_match": 1.0}
    assert process_results_boxed(doc, ["1200"]) == {"exact_match": 0.0}
    assert process_results_arith({"prompt": "23+58=", "answer": "81"}, [" 81 "]) == {"exact_match": 1.0}
    assert process_results_arith({"prompt": "23+58=", "answer": "81"}, ["81<pad>"]) == {"exact_match": 0.0}


def test_unknown_and_mismatched_tasks_fail_before_loading_anything(tmp_path):
    cfg = arith_config("nf4")
    with pytest.raises(ValueError, match=r"qrl_arth \(did you mean qrl_arith\?\).*harness's tasks are qrl_arith, qrl_boxed"):
        evaluate_run(cfg, tmp_path, CPU, LmEvalSettings(tasks=("qrl_arth",)))
    with pytest.raises(ValueError, match="held-out set of the harness task boxed, but this run's task is arith"):
        evaluate_run(cfg, tmp_path, CPU, LmEvalSettings(tasks=("qrl_arith", "qrl_boxed")))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # indexes lm-eval's ~15k task files (~13 s)
def test_a_name_in_neither_the_harness_nor_lm_evals_registry_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown lm-eval task.*gsm8kk \\(did you mean gsm8k\\?\\)"
                                         ".*harness's tasks are qrl_arith"):
        evaluate_run(arith_config("nf4"), tmp_path, CPU, LmEvalSettings(tasks=("qrl_arith", "gsm8kk")))
    assert not any(tmp_path.iterdir())
