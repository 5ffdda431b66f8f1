"""W&B mirror of the JSONL tracker: one W&B run per harness run, grouped by matrix.

metrics.jsonl stays the source of truth (verdicts read it) and W&B a view of it, so a wandb failure
turns the mirror off with one warning and never fails a run. wandb is imported only when used.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
import sys
import zlib
from pathlib import Path
from typing import Literal

from pydantic import Field

from harness.config.run import Frozen


class WandbSettings(Frozen):
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: no network, no login; `wandb sync results/<matrix>/*/wandb` uploads it later")
    project: str | None = Field(None, description="W&B project; None: the matrix name")
    entity: str | None = Field(None, description="W&B user or team; None: the logged-in account's default")


def require_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise RuntimeError("tracking.wandb needs the wandb package: pip install 'quant-rl-harness[wandb]'") from e


def wandb_run_id(run_dir: Path, group: str, settings: WandbSettings) -> str:
    """The harness run_id, so a resumed run resumes its W&B run. run_ids hash the config, so in a
    project shared by several matrices one config would be one W&B run: the matrix name joins it."""
    return run_dir.name if settings.project is None else f"{run_dir.name}-{re.sub(r'[^A-Za-z0-9_.-]', '_', group)}"[:64]


def _init(run_dir: Path, settings: WandbSettings, group: str, **run):
    import wandb

    # workaround(wandb 0.31): the warnings wandb prints after init heed setup's settings, not init's
    wandb.setup(wandb.Settings(silent=True))
    return wandb.init(id=wandb_run_id(run_dir, group, settings), resume="allow", dir=run_dir, mode=settings.mode,
                      project=settings.project or group, entity=settings.entity, group=group,
                      reinit="create_new",  # never hand back another, unfinished run of this process
                      settings=wandb.Settings(silent=True, console="off"), **run)  # the sweep's console stays its own


def _exit_code(status: str | None) -> int:
    return int(status not in ("ok", "pruned"))  # W&B shows the rest as failed runs


class WandbTracker:
    """The same metric names and steps as metrics.jsonl, samples as a wandb.Table, the summary's
    scalars in run.summary. Offline, one offline-run-* folder per (re)start under <run_dir>/wandb/."""

    def __init__(self, run_dir: Path, config: dict, settings: WandbSettings, group: str, name: str, tags: list[str]):
        self._run, self._floor = None, 0  # _floor: the lowest step W&B may still take
        try:
            self._run = _init(run_dir, settings, group, config=config, name=name, tags=list(tags))
            # wandb drops (with a console warning) steps below its last, and an offline restart knows none of its
            # earlier fragments': steps a resumed run replays after its checkpoint are skipped where W&B has them.
            self._floor = max(self._run.starting_step, recorded_step(run_dir / "wandb", self._run.id) + 1)
        except Exception as e:
            self._off(e)

    def log_config(self, config: dict) -> None:
        self._guard(lambda run: run.config.update(config, allow_val_change=True))

    def log(self, metrics: dict, step: int) -> None:
        self._log_at(step, lambda run: run.log(dict(metrics), step=step))

    def log_samples(self, samples: list[dict], step: int) -> None:
        def log(run):
            import wandb

            rows = [[step, s.get("prompt"), s.get("completion"), s.get("reward")] for s in samples]
            run.log({"samples": wandb.Table(columns=["step", "prompt", "completion", "reward"], data=rows)}, step=step)

        self._log_at(step, log)

    def finish(self, summary: dict) -> None:
        scalars = {k: v for k, v in summary.items() if v is None or isinstance(v, (str, int, float, bool))}
        self._guard(lambda run: (run.summary.update(scalars), run.finish(exit_code=_exit_code(summary.get("status")))))
        self._run = None

    def _log_at(self, step: int, call) -> None:
        if step >= self._floor:  # the same step again is fine: wandb merges it into that row
            self._guard(call)
            self._floor = step

    def _guard(self, call) -> None:
        if self._run is not None:
            try:
                call(self._run)
            except Exception as e:
                self._off(e)

    def _off(self, e: Exception) -> None:
        run, self._run = self._run, None
        print(f"warning: W&B mirror off for this run ({type(e).__name__}: {e}); its own results are unaffected", file=sys.stderr)
        with contextlib.suppress(Exception):  # a best effort: the run may be what broke
            if run is not None:
                run.finish(exit_code=1)


def record_verdicts(run_dirs_to_verdict: dict[Path, dict], settings: WandbSettings, group: str) -> None:
    """Put each run's verdict fields (e.g. {"verdict/run": "converged", "verdict/cell": "Converges"}) into
    its W&B run's summary, once the sweep is judged. The run is resumed by id: online, in place; offline,
    as one more offline-run-* fragment (same id, resume flag, the verdicts as summary) that `wandb sync`
    uploads after the run's others (in start-time order, each resuming the last: checked on the files,
    not against a server). Runs never mirrored get no W&B run; wandb failing warns once and stops.
    """
    for run_dir, fields in run_dirs_to_verdict.items():
        if (run_dir / "wandb").is_dir():
            summary = run_dir / "summary.json"
            try:
                status = json.loads(summary.read_text()).get("status") if summary.exists() else None
                run = _init(run_dir, settings, group)
                run.summary.update(fields)
                run.finish(exit_code=_exit_code(status))  # the last fragment's exit sets the run's W&B state
            except Exception as e:
                print(f"warning: W&B verdicts not recorded ({type(e).__name__}: {e}); verdicts.json has them", file=sys.stderr)
                return


def read_records(path: Path):
    """The records (wandb.proto.wandb_internal_pb2.Record) of a .wandb transaction log, which wandb's Go
    core writes and no longer ships a Python reader for: a 7-byte header (":W&B", 0xBEE1, version), then
    32 KiB LevelDB log blocks of chunks with a CRC32 of type and data. Stops at a torn or corrupt chunk."""
    # workaround(wandb 0.31): no Python reader of its transaction log ships with it; this one reads its format
    from wandb.proto.wandb_internal_pb2 import Record

    block, data, pos, parts = 32 * 1024, path.read_bytes(), 7, []
    while data[:6] == b":W&B\xe1\xbe" and pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, n, kind = struct.unpack_from("<IHB", data, pos)
        parts.append(chunk := data[pos + 7 : pos + 7 + n])
        if len(chunk) < n or zlib.crc32(bytes([kind]) + chunk) != crc:
            return
        pos += 7 + n
        if kind in (1, 4):  # a FULL record, or the LAST chunk of one
            (record := Record()).ParseFromString(b"".join(parts))
            parts = []
            yield record


def recorded_step(wandb_dir: Path, run_id: str) -> int:
    """The highest history step in this W&B run's local transaction logs (offline-run-*, run-*); -1 if none."""
    files = wandb_dir.glob(f"*run-*/run-{run_id}.wandb")  # not latest-run, a link to one of them
    return max((r.history.step.num for f in files for r in read_records(f) if r.HasField("history")), default=-1)
