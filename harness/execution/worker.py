"""`python -m harness.execution.worker RUN_DIR`: one run in a process of its own, as the local executor starts
it (RUN_DIR/job.json says what to run); `run_job` is also what a Ray task calls.

A stop (SIGINT or SIGTERM from the executor, or the executor dying) ends the run without a
summary.json, so the next sweep resumes it from its last checkpoint; anything else the run
itself records (run_one).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def job_payload(job, device: str) -> dict:
    """What a worker needs to run `job` (an executor.Job), as JSON."""
    return {"config": job.cfg.model_dump(mode="json"), "options": job.options.model_dump(mode="json"), "device": device,
            "run_dir": str(job.run_dir)}


def run_job(payload: dict) -> dict:
    from transformers.utils import logging as hf_logging

    from harness.common.system import pick_device
    from harness.config.run import RunConfig
    from harness.execution.jobs import RunOptions
    from harness.execution.lifecycle import run_one

    hf_logging.disable_progress_bar()  # the executor draws progress from metrics.jsonl; bars would only fill the log
    cfg = RunConfig.model_validate(payload["config"])
    return run_one(cfg, Path(payload["run_dir"]), pick_device(payload["device"]), options=RunOptions(**payload["options"]))


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(run_dir: Path) -> int:
    from harness.common.files import locked
    from harness.common.processes import die_with_parent
    from harness.results.layout import read_json

    signal.signal(signal.SIGTERM, _stop)
    try:
        if "QRL_PARENT_PID" in os.environ:
            # the executor killed outright: its runs get SIGTERM instead of training on unattended (the next
            # sweep would then resume them a second time, into the same folder)
            die_with_parent(int(os.environ["QRL_PARENT_PID"]))
        # a run stopped a moment ago (its sweep was killed) may still be writing its last checkpoint
        # when the next sweep starts it again: wait for it
        waiting = f"waiting for another process to stop training into {run_dir}"
        with locked(run_dir / ".lock", on_wait=lambda: print(waiting, flush=True)):
            if not (run_dir / "summary.json").exists():  # the process it waited for may have finished the run
                run_job(read_json(run_dir / "job.json"))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
