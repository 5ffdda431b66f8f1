"""Issue 23's grid, cell by cell: which GPU measured each configuration (its median step, s) and why a cell has no
figure. Reads the scale.json of every `reports/bench-scale-<gpu>/` given, the first one's card first:

    python bench/scale_grid.py reports/bench-scale-h200 reports/bench-scale-h100 > reports/bench-scale-h200/grid.md

A configuration is a shape x quant x completion length; its cells are the issue's pairs (harness and TRL in-process,
harness and TRL with colocated vLLM) and the raw-vLLM limit beside them (CUDA graphs, with the adapter). A cell no
card ran says whether it can run at all: TRL's vLLM path cannot sync an nf4 trainer with vLLM 0.26 (it pushes
merged, packed 4-bit weights that vLLM's loader refuses); anything else is device time not spent yet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scale_rows import MAX_NEW, QUANTS, SHAPES, _ok, key  # noqa: E402

COLUMNS = (("harness", "harness in-process"), ("trl", "TRL in-process"), ("harness-vllm", "harness colocated vLLM"),
           ("trl-vllm", "TRL vLLM colocate"), ("vllm-lora", "raw vLLM + LoRA (limit)"))
CANNOT = {("nf4", "trl-vllm"): "cannot run: vLLM 0.26 refuses TRL's merged, packed 4-bit weights"}


def load(folder: Path) -> tuple[str, dict]:
    """A card's name (the folder's suffix) and its rows by (model, quant, max_new, side)."""
    rows = json.loads((folder / "scale.json").read_text())["rows"]
    return folder.name.rsplit("-", 1)[-1].upper(), {key(r): r for r in rows}


def cell(cards: list[tuple[str, dict]], case: tuple) -> tuple[str, bool]:
    """The first card's ok figure, else the next one's; else why none ran (a failure's status, or not measured).
    The flag: whether a card measured it."""
    failed = []
    for card, rows in cards:
        row = rows.get(case)
        if _ok(row):
            return f"{card} {row['step_s_median']:.2f}", True
        if row:
            failed.append(f"{card} {row['status']}")
    quant, side = case[1], case[3]
    return CANNOT.get((quant, side)) or ("; ".join(failed) if failed else "not run"), False


def grid(folders: list[Path]) -> str:
    cards = [load(f) for f in folders]
    lines = [f"Issue 23's grid: the median step (s) of each configuration, from {', '.join(c for c, _ in cards)} "
             f"(first found wins). `not run`: no card has measured it yet (device time). Coverage only: ratios come from "
             f"one machine's rows, in each card's tables.md.", "",
             "| shape | quant | new tokens | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    measured = []
    for shape in SHAPES:
        for quant in QUANTS:
            for max_new in MAX_NEW:
                cells = [cell(cards, (f"shape:{shape}", quant, max_new, side)) for side, _ in COLUMNS]
                measured += [done for _, done in cells]
                lines.append(f"| {shape} | {quant} | {max_new} | " + " | ".join(text for text, _ in cells) + " |")
    lines += ["", f"{sum(measured)} of {len(measured)} cells measured on some card."]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    missing = [a for a in sys.argv[1:] if not (Path(a) / "scale.json").is_file()]
    if missing:
        sys.exit(f"error: no scale.json in {', '.join(missing)} (a reports/bench-scale-<gpu>/ folder)")
    print(grid([Path(a) for a in sys.argv[1:]]))


if __name__ == "__main__":
    main()
