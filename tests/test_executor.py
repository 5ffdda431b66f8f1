import os

import pytest
import torch

from harness.config import RunConfig
from harness.executor import in_own_process, own_process_needed


def test_in_own_process_returns_the_childs_result_and_raises_its_errors():
    assert in_own_process(os.getpid) != os.getpid()
    with pytest.raises(ZeroDivisionError):
        in_own_process(divmod, 1, 0)


def test_only_colocated_vllm_on_cuda_gets_its_own_process():
    colocated = RunConfig(rollout={"colocation": "colocated", "quantization": "bf16"})
    assert own_process_needed(colocated, torch.device("cuda"))
    assert not own_process_needed(colocated, torch.device("cpu"))  # vLLM's CPU backend has no CuMem pool
    assert not own_process_needed(RunConfig(rollout={"colocation": "server", "quantization": "bf16"}), torch.device("cuda"))
    assert not own_process_needed(RunConfig(), torch.device("cuda"))
