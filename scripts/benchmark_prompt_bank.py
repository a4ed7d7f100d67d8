#!/usr/bin/env python
"""N tasks' prompts in one encoder pass (PromptBank.forward_all) vs N separate passes.

Builds a random-init timm ViT with VPT prompts, N random tasks (prompts + linear head),
and times inference of a batch of B images for every task two ways: one pass of N * B
samples with per-sample prompts, and N passes of B samples, one per task with its prompts
shared by the batch. Both give the same logits (checked here; tests/test_prompt_bank.py
checks it against separately built models). Prints a markdown table of median times.

    python scripts/benchmark_prompt_bank.py --model vit_small_patch16_224 --batch 4 --tasks 1 4 8
    python scripts/benchmark_prompt_bank.py --device cuda --batch 32 --tasks 1 4 8 16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import timm
import torch
from torch import nn

from vpt.prompts import PromptBank, PromptedViT, PromptTask


def median_ms(
    first: Callable[[], object], second: Callable[[], object], repeats: int, device: torch.device
) -> tuple[float, float]:
    """Median milliseconds of ``first`` and ``second``, timed alternately so that load from
    other processes on a shared machine hits both alike."""

    def once(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    first(), second()  # warm-up
    times = [(once(first), once(second)) for _ in range(repeats)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--shallow", action="store_true", help="VPT-shallow prompts (default VPT-deep)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    vit = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=0).eval()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)

    # One wrapper per task over the same frozen trunk: what N separate runs would load.
    max_tasks = max(args.tasks)
    separate = [PromptedViT(vit, args.tokens, deep=not args.shallow).to(device).eval() for _ in range(max_tasks)]
    heads = [nn.Linear(vit.num_features, args.classes).to(device).eval() for _ in range(max_tasks)]

    def run_separately(count: int) -> list[torch.Tensor]:
        return [
            head(model.forward_head(model.forward_features(images), pre_logits=True))
            for model, head in zip(separate[:count], heads[:count])
        ]

    kind = "shallow" if args.shallow else "deep"
    print(f"{args.model} @ {args.img_size}px, VPT-{kind} {args.tokens} tokens, batch {args.batch}, {args.device}, "
          f"torch {torch.__version__}, {machine(device)}\n")
    print("| tasks | one pass (forward_all) ms | separate passes ms | speed-up |")
    print("|---:|---:|---:|---:|")
    for count in args.tasks:
        tasks = [
            PromptTask(f"task{index}", separate[index].prompt_embeddings.detach(), heads[index])
            for index in range(count)
        ]
        bank = PromptBank(separate[0], tasks).to(device)
        with torch.inference_mode():
            together, apart = bank.forward_all(images), run_separately(count)
            for logits, reference in zip(together.values(), apart):
                torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
            one_pass, split = median_ms(lambda: bank.forward_all(images), lambda: run_separately(count), args.repeats, device)
        print(f"| {count} | {one_pass:.1f} | {split:.1f} | {split / one_pass:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
