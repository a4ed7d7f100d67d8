#!/usr/bin/env python
"""Ablation of the segmentation pipeline on the CT phantoms: decoder x context x sampling.

Trains the quickstart (micro ViT, VPT-deep, the same epochs and optimiser) once per
combination of

* decoder: ``light`` (last block's patch tokens) or ``multilevel`` (several blocks + image stem),
* context: one slice, or slices z-1, z, z+1 as channels (``task.data.context_slices``),
* sampling: whole slices resized to the model's input, or tiles at a finer pixel size
  (``task.data.spacing``) predicted by Gaussian-blended overlapping tiles,

each run in its own process (``scripts/train.py``, nothing else changed), and writes a
Markdown table (test Dice, penalised HD95, NSD, the smallest organs' Dice, trained values) to
``--out``. The first row is the pipeline before the multi-level decoder, context and tiles
existed.

    python scripts/ablate_segmentation.py                       # 8 runs, ~15 min on 2 CPU cores
    python scripts/ablate_segmentation.py --seeds 0 1 --epochs 30 --out docs/ablation_segmentation.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SMALL_ORGANS = ("gallbladder", "pancreas")


def run_one(name: str, overrides: list[str], run_dir: Path, root: Path, epochs: int, seed: int) -> dict:
    """Train and test one setting in a fresh process; its metrics.json, plus the wall time."""
    args = [
        sys.executable, str(REPO / "scripts" / "train.py"), "experiment=quickstart", f"trainer.max_epochs={epochs}",
        f"seed={seed}", f"task.data.root={root}", "num_preview_images=0", "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}", *overrides,
    ]
    start = time.perf_counter()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{name} (seed {seed}) failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["seconds"] = seconds
    return metrics


def _mean(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run (the quickstart's 30)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="training seeds (the quickstart's 42)")
    parser.add_argument("--spacing", type=float, default=1.6, help="tile pixel size, mm (the phantoms have 0.8)")
    parser.add_argument("--root", type=Path, default=REPO / "data" / "phantoms", help="phantom folder (generated)")
    parser.add_argument("--runs", type=Path, default=REPO / "outputs" / "ablation", help="where the runs go")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "ablation_segmentation.md")
    args = parser.parse_args()

    settings = []
    for decoder, context, tiles in itertools.product(("light", "multilevel"), (0, 1), (False, True)):
        overrides = [f"task.decoder={decoder}", f"task.data.context_slices={context}"]
        if tiles:
            overrides += [f"task.data.spacing={args.spacing}"]
        sampling = f"tiles at {args.spacing} mm" if tiles else "whole slice resized"
        settings.append((f"{decoder}-ctx{context}-{'tiles' if tiles else 'resize'}", decoder, context, sampling, overrides))

    rows = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name, decoder, context, sampling, overrides in settings:
        results = []
        for seed in args.seeds:
            run_dir = args.runs / stamp / f"{name}-seed{seed}"
            print(f"{name} seed {seed} ...", flush=True)
            results.append(run_one(name, overrides, run_dir, args.root.resolve(), args.epochs, seed))
            print(f"  dice {results[-1]['test/dice']:.3f} in {results[-1]['seconds']:.0f} s", flush=True)
        organs = {organ: [r["test/per_organ"][organ]["dice"] for r in results] for organ in SMALL_ORGANS}
        rows.append([
            decoder, "z-1, z, z+1" if context else "z", sampling,
            _mean([r["test/dice"] for r in results]),
            _mean([r["test/hd95_penalised"] for r in results]),
            _mean([r["test/nsd"] for r in results]),
            *(_mean(organs[organ]) for organ in SMALL_ORGANS),
            f"{results[0]['trainable_params'] / 1e6:.2f} M" if "trainable_params" in results[0] else "",
        ])

    header = ["decoder", "context", "sampling", "Dice", "HD95 pen. (mm)", "NSD (1 mm)", *(f"{o} Dice" for o in SMALL_ORGANS), "trained"]
    lines = [
        "# Segmentation ablation on the CT phantoms",
        "",
        f"`python scripts/ablate_segmentation.py --epochs {args.epochs} --seeds {' '.join(map(str, args.seeds))} --spacing {args.spacing}`",
        f"(experiment=quickstart: micro ViT, random init, VPT-deep 8 tokens, {args.epochs} epochs; 12 phantoms, 3 test cases).",
        f"torch {torch.__version__}, {platform.machine()}, {time.strftime('%Y-%m-%d')}. Mean ± standard deviation "
        "over seeds when more than one. Trained values: prompts + decoder.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    print(f"Written to {args.out}")


if __name__ == "__main__":
    main()
