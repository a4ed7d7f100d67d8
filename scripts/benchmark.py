#!/usr/bin/env python
"""Training-step speed and memory of every method on ViT-B/16 (224 px) and SAM ViT-B (1024 px),
and prompt inference against the frozen backbone. Random init, real sizes.

Training table: one row per method x backbone x precision, plus reference rows: the naive
deep-prompt form (concatenate -> block -> slice, as the official VPT code runs it) on ViT-B
and, on SAM, segment-anything's own encoder (its attention materialises the N x N scores;
the input requires grad so the backward pass crosses every block, as deep prompts make it)
and our dense-bias attention (``attention="bias"``, the reference of the folded default).
A step is forward, loss, backward and an AdamW step on the trainable tensors (a 1x1-conv
head on SAM's embeddings, so every method has something to train). Contenders are
interleaved over ``--repeats`` (each repeat times ``--steps`` steps after a warm-up), and
the table gives medians with the spread (min-max). Memory: on CUDA the peak of
``torch.cuda.max_memory_allocated`` over the timed steps; on CPU every measurement runs in
its own process and reports its peak RSS minus the RSS once the model was built. TFLOP/s:
FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` over the median
step time, against the device's measured matmul peak in that precision.

Inference table: ViT-B/16 224 px forward of the frozen backbone alone, and with 50 deep
prompts: keys/values kept across batches (the default in eval mode), recomputed each
batch, and the naive concatenation.

    python scripts/benchmark.py                                   # this machine, every row (hours on a CPU)
    python scripts/benchmark.py --backbones vit_b --methods vpt_deep linear lora   # the CPU table in docs/
    python scripts/benchmark.py --backbones sam_vit_b --methods vpt_deep --repeats 1 --no-inference --no-flops
    python scripts/benchmark.py --device cuda --dtypes fp32 bf16 --vit-batch 128 --sam-batch 4
    python scripts/benchmark.py --tiny --repeats 1 --out /tmp/bench.md   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from benchmark_page import write_section  # scripts/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("vpt_deep", "vpt_shallow", "linear", "lora", "adapter", "bitfit", "partial", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT_TOKENS = 50  # VPT-deep's usual count (the paper's best for many VTAB tasks)


@dataclass(frozen=True)
class Contender:
    backbone: str  # vit_b | sam_vit_b | sam2_hiera_b_plus
    method: str  # a method name, or a reference: naive_concat | segment_anything | bias_attention
    dtype: str


HIERA = "sam2_hiera_b_plus"  # SAM2.1 Hiera-B+ at 1024 px (timm's HieraDet), batch --sam-batch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vit(tiny: bool) -> nn.Module:
    import timm

    if tiny:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)


def _sam_encoder(tiny: bool) -> nn.Module:
    from vpt.backbones.sam import build_sam_tiny, build_sam_vit_b

    sam = build_sam_tiny(img_size=64) if tiny else build_sam_vit_b(img_size=1024)
    return sam.image_encoder


def _hiera(tiny: bool) -> nn.Module:
    import timm

    if tiny:
        return timm.create_model(
            "sam2_hiera_tiny", pretrained=False, embed_dim=16, num_heads=1, stages=(1, 2, 2, 2), q_pool=3,
            window_spec=(4, 4, 2, 3), global_att_blocks=(4,), global_pos_size=(4, 4),
        )
    return timm.create_model("sam2_hiera_base_plus", pretrained=False)


class _HieraWithHead(nn.Module):
    """A prompted Hiera's last stage (B, C, H/32, W/32) -> a 1x1 conv, as the SAM rows."""

    def __init__(self, encoder: nn.Module, channels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Conv2d(channels, 8, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


def _options(method: str) -> dict:
    return {"num_tokens": PROMPT_TOKENS} if method in ("vpt_deep", "vpt_shallow") else {}


class _SamWithHead(nn.Module):
    def __init__(self, encoder: nn.Module, channels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Conv2d(channels, 8, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


def build(contender: Contender, tiny: bool) -> tuple[nn.Module, tuple[int, int], bool]:
    """The network, its input size, and whether the input must require grad (reference rows)."""
    from vpt.families import family_of
    from vpt.methods import apply_method, build_method
    from vpt.prompts import PromptedSamEncoder, PromptedViT

    if contender.backbone == HIERA:
        hiera = _hiera(tiny)
        size = (64, 64) if tiny else (1024, 1024)
        channels = family_of(hiera).feature_levels(hiera)[-1].width
        return _HieraWithHead(apply_method(hiera, contender.method, **_options(contender.method)), channels), size, False
    if contender.backbone == "vit_b":
        vit = _vit(tiny)
        size = vit.patch_embed.img_size
        if contender.method == "naive_concat":
            model = PromptedViT(vit, PROMPT_TOKENS, deep=True, key_value_prompts=False)
            model.reset_classifier(10)
            return model, size, False
        return build_method(contender.method, vit, 10, **_options(contender.method)), size, False
    encoder = _sam_encoder(tiny)
    size = (encoder.img_size, encoder.img_size)
    channels = family_of(encoder).feature_levels(encoder)[-1].width
    if contender.method == "segment_anything":
        encoder.requires_grad_(False)
        return _SamWithHead(encoder, channels), size, True
    if contender.method == "bias_attention":
        return _SamWithHead(PromptedSamEncoder(encoder, PROMPT_TOKENS, attention="bias"), channels), size, False
    return _SamWithHead(apply_method(encoder, contender.method, **_options(contender.method)), channels), size, False


class Step:
    """One training step of a built contender, callable repeatedly."""

    def __init__(self, contender: Contender, batch: int, device: torch.device, tiny: bool) -> None:
        torch.manual_seed(0)
        self.model, size, self.input_grad = build(contender, tiny)
        self.model.to(device).train()
        self.dtype = DTYPES[contender.dtype]
        self.device = device
        self.images = torch.randn(batch, 3, *size, device=device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None

    def __call__(self) -> None:
        images = self.images.detach().requires_grad_(self.input_grad)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(images)
        loss = out.float().square().mean()
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def count_flops(step: Step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def time_steps(step: Step, steps: int) -> tuple[float, float]:
    """Seconds per step and the peak memory (CUDA bytes; NaN on CPU, measured by the caller)."""
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step.sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step.sync()
    seconds = (time.perf_counter() - start) / steps
    peak = float(torch.cuda.max_memory_allocated()) if step.device.type == "cuda" else float("nan")
    return seconds, peak


def matmul_peak(device: torch.device, dtype: torch.dtype, tiny: bool) -> float:
    """Measured TFLOP/s of a large square matmul in ``dtype``: the best of several trials
    (a busy CPU only ever runs slower than it can)."""
    n = 512 if tiny else (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    repeats = 20 if device.type == "cuda" else 3
    best = 0.0
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12)
    return best


# -- one measurement in its own process (CPU memory) -------------------------------------------


def child(args: argparse.Namespace) -> None:
    contender = Contender(**json.loads(args.child))
    device = torch.device(args.device)
    batch = args.vit_batch if contender.backbone == "vit_b" else args.sam_batch
    step = Step(contender, batch, device, args.tiny)
    built = _rss_bytes()
    step()  # warm-up (allocator, lazy init)
    flops = count_flops(step) if args.flops else float("nan")
    seconds, peak = time_steps(step, args.steps)
    if device.type == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 - built
    print("RESULT " + json.dumps({"seconds": seconds, "peak": peak, "flops": flops, "trainable": sum(p.numel() for p in step.params)}))


def run_in_process(contender: Contender, args: argparse.Namespace, flops: bool) -> dict:
    command = [
        sys.executable, __file__, "--child", json.dumps(asdict(contender)), "--device", args.device,
        "--steps", str(args.steps), "--vit-batch", str(args.vit_batch), "--sam-batch", str(args.sam_batch),
    ] + (["--tiny"] if args.tiny else []) + (["--flops"] if flops else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1][len("RESULT "):])


def measure_training(contenders: list[Contender], args: argparse.Namespace) -> dict[Contender, dict]:
    """Interleaved repeats: every contender once per repeat, in the same order."""
    device = torch.device(args.device)
    samples: dict[Contender, list[dict]] = {c: [] for c in contenders}
    # CUDA: every contender stays on the GPU between repeats; its peak is counted without the
    # other contenders' resident tensors (what it holds itself, weights and optimiser state
    # included, plus what its step allocates).
    built: dict[Contender, tuple[Step, int]] = {}
    for repeat in range(args.repeats):
        for contender in contenders:
            first = repeat == 0
            if device.type == "cpu":
                sample = run_in_process(contender, args, flops=first and not args.no_flops)
            else:
                try:
                    if contender not in built:
                        before = torch.cuda.memory_allocated()
                        batch = args.vit_batch if contender.backbone == "vit_b" else args.sam_batch
                        step = Step(contender, batch, device, args.tiny)
                        step()
                        built[contender] = (step, torch.cuda.memory_allocated() - before)
                    step, own = built[contender]
                    others = torch.cuda.memory_allocated() - own
                    seconds, peak = time_steps(step, args.steps)
                    sample = {"seconds": seconds, "peak": peak - others, "trainable": sum(p.numel() for p in step.params)}
                    sample["flops"] = count_flops(step) if first and not args.no_flops else float("nan")
                except torch.OutOfMemoryError:
                    sample = {"error": "out of memory"}
                    built.pop(contender, None)
                    torch.cuda.empty_cache()
            samples[contender].append(sample)
            label = f"{contender.backbone} {contender.method} {contender.dtype}"
            shown = sample.get("error") or f"{sample['seconds'] * 1000:.0f} ms/step, peak {sample['peak'] / 2**30:.2f} GiB"
            print(f"  repeat {repeat + 1}/{args.repeats} {label}: {shown}", flush=True)
    return samples


def measure_inference(args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    """Frozen ViT-B vs deep prompts at inference, interleaved: (name, median ms, min, max)."""
    from vpt.prompts import PromptedViT

    device = torch.device(args.device)
    batch = args.vit_batch
    torch.manual_seed(0)
    base = _vit(args.tiny).to(device).eval()
    kept = PromptedViT(base, PROMPT_TOKENS, deep=True).to(device).eval()
    fresh = PromptedViT(base, PROMPT_TOKENS, deep=True).to(device).eval()
    fresh.cache_prompt_keys_values = False
    naive = PromptedViT(base, PROMPT_TOKENS, deep=True, key_value_prompts=False).to(device).eval()
    images = torch.randn(batch, 3, *base.patch_embed.img_size, device=device)
    dtype = DTYPES[args.inference_dtype]
    contenders = {
        "frozen backbone alone": lambda: base.forward_features(images),
        f"VPT-deep {PROMPT_TOKENS}, kept keys/values (default)": lambda: kept.forward_features(images),
        f"VPT-deep {PROMPT_TOKENS}, keys/values each batch": lambda: fresh.forward_features(images),
        f"VPT-deep {PROMPT_TOKENS}, naive concatenation": lambda: naive.forward_features(images),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for fn in contenders.values():
            fn()
        for _ in range(args.inference_rounds):
            for name, fn in contenders.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) / args.steps * 1000)
    return [(name, statistics.median(v), min(v), max(v)) for name, v in times.items()]


# -- report ----------------------------------------------------------------------------------------


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _rate(value: float) -> str:
    """Images per second with three significant digits (0.0287 on a CPU, 2857 on a GPU)."""
    return f"{value:.1f}" if value >= 100 else f"{value:.3g}"


def report(samples: dict[Contender, list[dict]], inference, peaks: dict[str, float], args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    names = {
        "naive_concat": f"vpt_deep {PROMPT_TOKENS}, naive concatenation (reference)",
        "segment_anything": "segment-anything's own attention (reference)",
        "bias_attention": f"vpt_deep {PROMPT_TOKENS}, dense-bias attention (reference)",
    }
    memory = "peak CUDA memory allocated" if device.type == "cuda" else "peak RSS over the built model, own process"
    lines = [
        f"### {_machine(device)}",
        "",
        f"`{' '.join(['python', 'scripts/benchmark.py', *sys.argv[1:]])}` — torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.",
        f"Random init, real sizes; ViT-B/16 at 224 px batch {args.vit_batch}, SAM ViT-B and SAM2.1 Hiera-B+ at 1024 px batch {args.sam_batch}"
        + (" (--tiny: small stand-ins, not real sizes)" if args.tiny else "")
        + f"; {args.repeats} interleaved repeats of {args.steps} steps; median (min-max). Memory: {memory}.",
        "Matmul peak measured here: " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.items()) + ".",
        "",
        "| backbone | method | precision | trained | images/s | ms/step | peak memory (GiB) | vs reference | TFLOP/s | of peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference_memory: dict[tuple[str, str], float] = {}
    for contender, rows in samples.items():
        good = [r for r in rows if "error" not in r]
        if contender.method in ("segment_anything", "naive_concat") and good:
            reference_memory[(contender.backbone, contender.dtype)] = statistics.median(r["peak"] for r in good)
    for contender, rows in samples.items():
        good = [r for r in rows if "error" not in r]
        name = names.get(contender.method, contender.method + (f" {PROMPT_TOKENS}" if contender.method.startswith("vpt") else ""))
        if not good:
            lines.append(f"| {contender.backbone} | {name} | {contender.dtype} | | {rows[0]['error']} | | | | | |")
            continue
        batch = args.vit_batch if contender.backbone == "vit_b" else args.sam_batch
        seconds = [r["seconds"] for r in good]
        peak = [r["peak"] / 2**30 for r in good]
        flops = next((r["flops"] for r in good if r.get("flops") == r.get("flops")), float("nan"))
        median = statistics.median(seconds)
        tflops = flops / median / 1e12
        counted = tflops == tflops  # NaN when FLOPs were not counted (--no-flops)
        reference = reference_memory.get((contender.backbone, contender.dtype))
        ratio = f"{statistics.median(peak) * 2**30 / reference:.2f}x" if reference else ""
        lines.append(
            f"| {contender.backbone} | {name} | {contender.dtype} | {good[0]['trainable'] / 1e6:.2f} M "
            f"| {_rate(batch / median)} ({_rate(batch / max(seconds))}-{_rate(batch / min(seconds))}) "
            f"| {median * 1000:.0f} | {statistics.median(peak):.2f} ({min(peak):.2f}-{max(peak):.2f}) | {ratio} "
            + (f"| {tflops:.2f} | {100 * tflops / peaks.get(contender.dtype, float('nan')):.0f}% |" if counted else "| | |")
        )
    lines.append("")
    lines.append("'vs reference': peak memory over the reference row of the same backbone and precision "
                 "(naive concatenation for ViT-B, segment-anything's attention for SAM).")
    if inference:
        frozen = inference[0][1]
        lines += [
            "",
            f"Inference, {'tiny ViT stand-in' if args.tiny else 'ViT-B/16 224 px'}, batch {args.vit_batch}, "
            f"{args.inference_dtype}, forward only:",
            "",
            "| model | ms/batch | vs frozen backbone |",
            "|---|---|---|",
            *(f"| {name} | {median:.1f} ({low:.1f}-{high:.1f}) | {median / frozen:.3f}x |" for name, median, low, high in inference),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbones", nargs="+", default=["vit_b", "sam_vit_b", HIERA], choices=["vit_b", "sam_vit_b", HIERA])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-references", action="store_true", help="skip the naive / segment-anything / dense-bias rows")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES), help="default: fp32 on CPU, fp32 bf16 on CUDA")
    parser.add_argument("--vit-batch", type=int, default=None, help="default 8 on CPU, 128 on CUDA")
    parser.add_argument("--sam-batch", type=int, default=None, help="default 1 on CPU, 4 on CUDA (SAM and Hiera-B+ at 1024 px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 1 on CPU, 5 on CUDA)")
    parser.add_argument("--inference-dtype", default=None, choices=list(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--no-inference", action="store_true")
    parser.add_argument("--inference-rounds", type=int, default=15, help="interleaved rounds of the inference table")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one step less per contender)")
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="small stand-in models (a smoke test of the script)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtypes = args.dtypes or (["fp32", "bf16"] if cuda else ["fp32"])
    args.vit_batch = args.vit_batch or (128 if cuda else 8)
    args.sam_batch = args.sam_batch or (4 if cuda else 1)
    args.steps = args.steps or (5 if cuda else 1)
    args.inference_dtype = args.inference_dtype or ("bf16" if cuda else "fp32")
    if args.child:
        child(args)
        return
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here

    contenders = []
    for backbone in args.backbones:
        for dtype in args.dtypes:
            if not args.no_references and backbone != HIERA:  # Hiera's reference is timm's HieraDet: the linear row
                references = ["naive_concat"] if backbone == "vit_b" else ["segment_anything", "bias_attention"]
                contenders += [Contender(backbone, name, dtype) for name in references]
            # vpt_shallow has no definition in Hiera's pooled stages (refused).
            contenders += [Contender(backbone, method, dtype) for method in args.methods if not (backbone == HIERA and method == "vpt_shallow")]
    device = torch.device(args.device)
    peaks = {name: matmul_peak(device, DTYPES[name], args.tiny) for name in sorted(set(args.dtypes) | {args.inference_dtype})}
    print(f"{_machine(device)}; matmul peak " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.items()), flush=True)
    samples = {} if args.no_training else measure_training(contenders, args)
    inference = [] if args.no_inference else measure_inference(args)
    body = report(samples, inference, peaks, args)
    print(body)
    parts = ["tiny" if args.tiny else ("cuda" if cuda else "cpu")]
    parts += [] if args.no_training else args.backbones
    parts += [] if args.no_inference else ["inference"]
    write_section(args.out, "-".join(parts), body)
    print(f"Written to {args.out}")


if __name__ == "__main__":
    main()
