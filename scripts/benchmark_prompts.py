#!/usr/bin/env python
"""Deep prompts as keys/values only vs the naive concatenate -> block -> slice form.

Times a training step (forward + backward into the prompts and head) of a random-init timm
ViT with VPT-deep prompts, both ways, and prints a table; on CUDA it also reports peak
memory. Both paths compute the same result (tests/test_prompted_vit.py checks it).

    python scripts/benchmark_prompts.py --model vit_base_patch16_224 --batch 8 --tokens 50
    python scripts/benchmark_prompts.py --device cuda --dtype bfloat16 --batch 64
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from vpt.prompts import PromptedViT


def measure(model: PromptedViT, images: torch.Tensor, steps: int, dtype: torch.dtype) -> tuple[float, float]:
    device = images.device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for _ in range(2):  # warm-up
        with autocast:
            model(images).float().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        with autocast:
            model(images).float().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    vit = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=10).to(device)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    print(f"{args.model} @ {args.img_size}px, batch {args.batch}, {args.device}, {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'tokens':>6} {'naive ms':>10} {'kv-only ms':>11} {'speed-up':>9} {'naive GiB':>10} {'kv-only GiB':>12}")
    for tokens in args.tokens:
        rows = []
        for key_value in (False, True):
            model = PromptedViT(vit, tokens, deep=True, key_value_prompts=key_value).to(device)
            model.reset_classifier(10)
            model.to(device).train()
            rows.append(measure(model, images, args.steps, dtype))
        (naive_t, naive_m), (kv_t, kv_m) = rows
        print(f"{tokens:>6} {naive_t * 1e3:>10.1f} {kv_t * 1e3:>11.1f} {naive_t / kv_t:>8.2f}x {naive_m:>10.2f} {kv_m:>12.2f}")


if __name__ == "__main__":
    main()
