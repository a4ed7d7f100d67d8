"""Peak memory of one training epoch's data pipeline against the number of cases.

Writes N phantom CT cases (``write_phantom_dataset``) for each N, then in a fresh Python
process per setting builds the segmentation data module as the quickstart does
(``image_size`` 32, ``num_workers=0``), iterates the training and validation loaders once
with a forward and backward pass of a tiny convolutional model, and reports that process's
peak resident set size (``ru_maxrss``). With the on-disk cache (``task.data.cache=true``,
built cold in the measured process) the peak should not grow with N; without it the chosen
slices of every case stay in memory.

Usage::

    python scripts/benchmark_memory.py                      # N = 12 and 48, cache on and off
    python scripts/benchmark_memory.py --cases 12 96 --shape 64 160 160
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD_FLAG = "--child"
_WRITE_FLAG = "--write-phantoms"


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux), so import-time peaks do not hide the epoch's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _proc_status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (Linux): ``VmHWM`` (peak since the last
    :func:`_reset_peak_rss`) or ``VmRSS`` (now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_epoch(root: Path, cache: bool, cache_dir: Path, image_size: int) -> dict[str, float]:
    """One pass over the train and val loaders with a tiny model; runs in the measured process.

    Returns:
        ``{"peak_rss_mib"`` (whole process, ``ru_maxrss``), ``"epoch_peak_rss_mib"`` (peak
        from data module creation to the end) and ``"start_rss_mib"`` (RSS just before it;
        both NaN where they cannot be measured),
        ``"seconds", "train_slices", "val_slices"}``.
    """
    import torch
    from torch import nn

    from vpt.data.medical import VolumeSegmentationDataModule

    torch.manual_seed(0)
    epoch_peak_measurable = _reset_peak_rss()
    start_rss = _proc_status_mib("VmRSS") if epoch_peak_measurable else float("nan")
    start = time.perf_counter()
    module = VolumeSegmentationDataModule(
        root, layout="nnunet", image_size=image_size, batch_size=8, num_workers=0,
        val_fraction=0.17, test_fraction=0.25, cache=cache, cache_dir=cache_dir,
    )
    module.setup("fit")
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, module.num_classes, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    counts = {"train": 0, "val": 0}
    for batch in module.train_dataloader():
        loss = nn.functional.cross_entropy(model(batch["image"]), batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        counts["train"] += len(batch["image"])
    with torch.no_grad():
        for batch in module.val_dataloader():
            model(batch["image"])
            counts["val"] += len(batch["image"])
    return {
        "torch": torch.__version__,
        "peak_rss_mib": _peak_rss_mib(),
        "epoch_peak_rss_mib": _proc_status_mib("VmHWM") if epoch_peak_measurable else float("nan"),
        "start_rss_mib": start_rss,
        "seconds": time.perf_counter() - start,
        "train_slices": counts["train"],
        "val_slices": counts["val"],
    }


def measure(root: Path, cache: bool, cache_dir: Path, image_size: int) -> dict[str, float]:
    """Run :func:`run_epoch` in a fresh interpreter, so each peak is its own."""
    command = [sys.executable, str(Path(__file__).resolve()), _CHILD_FLAG, str(root), str(int(cache)), str(cache_dir), str(image_size)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_phantoms(root: Path, cases: int, shape: tuple[int, ...]) -> None:
    """Write the phantoms in another process: Linux carries a parent's peak RSS over fork and
    exec into ``ru_maxrss``, so this process must stay small for the children's peaks to count."""
    command = [sys.executable, str(Path(__file__).resolve()), _WRITE_FLAG, str(root), str(cases), *map(str, shape)]
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, nargs=2, default=(12, 48), metavar=("SMALL", "LARGE"))
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="phantom (D, H, W); the phantom default when omitted")
    parser.add_argument("--image-size", type=int, default=32, help="model input side (vit_micro: 32)")
    args = parser.parse_args(argv)
    # No torch or vpt import here: this process's RSS would be inherited by the measured ones.
    shape = tuple(args.shape) if args.shape else (32, 96, 96)  # vpt.data.medical.phantom.DEFAULT_PHANTOM_SHAPE
    results: dict[tuple[bool, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="vpt-memory-") as folder:
        for cases in args.cases:
            root = Path(folder) / f"phantoms_{cases}"
            write_phantoms(root, cases, shape)
            for cache in (True, False):
                cache_dir = Path(folder) / f"cache_{cases}_{int(cache)}"  # cold: built in the measured epoch
                results[cache, cases] = measure(root, cache, cache_dir, args.image_size)
                print(f"  N={cases} cache={cache}: {results[cache, cases]}", file=sys.stderr)

    small, large = args.cases
    print(f"Peak RSS of one epoch (train + val loaders, tiny model), phantoms {shape}, image_size {args.image_size}")
    print(f"parent ru_maxrss {_peak_rss_mib():.1f} MiB (inherited by the children); "
          f"torch {next(iter(results.values()))['torch']}, Python {platform.python_version()}, {platform.platform()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("Process peak = ru_maxrss of the whole process (imports included); epoch peak = VmHWM reset just "
          "before the data module is built (Linux); growth = epoch peak less the RSS at that moment "
          "(imports and the tiny model excluded), i.e. the data pipeline's own share.\n")
    print(f"| cache | measure | N={small} (MiB) | N={large} (MiB) | ratio {large}/{small} |")
    print("|---|---|---:|---:|---:|")
    for result in results.values():
        result["growth_mib"] = result["epoch_peak_rss_mib"] - result["start_rss_mib"]
    for cache in (True, False):
        a, b = results[cache, small], results[cache, large]
        for name, key in (
            ("process peak RSS", "peak_rss_mib"), ("epoch peak RSS", "epoch_peak_rss_mib"), ("epoch growth", "growth_mib")
        ):
            print(f"| {'on' if cache else 'off'} | {name} | {a[key]:.1f} | {b[key]:.1f} | {b[key] / a[key]:.3f} |")
    print(f"\n| cache | train slices {small} / {large} | epoch seconds {small} / {large} |")
    print("|---|---:|---:|")
    for cache in (True, False):
        a, b = results[cache, small], results[cache, large]
        print(f"| {'on' if cache else 'off'} | {a['train_slices']} / {b['train_slices']} | "
              f"{a['seconds']:.1f} / {b['seconds']:.1f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == _WRITE_FLAG:
        from vpt.data.medical.phantom import write_phantom_dataset

        write_phantom_dataset(Path(sys.argv[2]), int(sys.argv[3]), seed=0, shape=tuple(int(side) for side in sys.argv[4:7]))
    elif len(sys.argv) > 1 and sys.argv[1] == _CHILD_FLAG:
        root, cache, cache_dir, image_size = sys.argv[2:6]
        print(json.dumps(run_epoch(Path(root), cache == "1", Path(cache_dir), int(image_size))))
    else:
        main()
