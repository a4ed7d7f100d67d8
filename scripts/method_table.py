#!/usr/bin/env python
"""Trainable parameters of every method on ViT-B/16 (224 px) and SAM ViT-B (1024 px).

    python scripts/method_table.py [--classes 100]

Built on PyTorch's meta device (no weights, no memory), so it runs anywhere in seconds; the
README's method table is this script's output. Counts are the method's own tensors plus, for
classification, a ``--classes`` head (SAM: the encoder alone, the decoder is listed apart).
"""

from __future__ import annotations

import argparse
import logging

import timm
import torch

from vpt.backbones.sam import build_sam
from vpt.methods import apply_method, available_methods

# Options that make the table match the configs' defaults (configs/method/*.yaml).
DEFAULTS = {"vpt_deep": {"num_tokens": 50}, "vpt_shallow": {"num_tokens": 50}, "partial": {"k": 1}}


def count(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    logging.getLogger("vpt").setLevel(logging.ERROR)  # the random-init notice is expected here
    rows = []
    for method in available_methods():
        options = DEFAULTS.get(method, {})
        with torch.device("meta"):
            vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
            vit_model = apply_method(vit, method, **options)
            vit_model.reset_classifier(args.classes)
            sam = build_sam("sam_vit_b", pretrained=False, img_size=1024)
            sam_model = apply_method(sam.image_encoder, method, **options)
        vit_trainable, vit_total = count(vit_model)
        sam_trainable, sam_total = count(sam_model)
        rows.append((method, vit_trainable, 100 * vit_trainable / vit_total, sam_trainable, 100 * sam_trainable / sam_total))
    decoder = sum(p.numel() for p in sam.mask_decoder.parameters())
    print(f"| method | ViT-B/16 + {args.classes}-class head | % | SAM ViT-B encoder | % |")
    print("|---|---:|---:|---:|---:|")
    for method, vt, vp, st, sp in rows:
        print(f"| `{method}` | {vt:,} | {vp:.2f} | {st:,} | {sp:.2f} |")
    print(f"\nSAM's mask decoder ({decoder:,} parameters) trains with every method unless task.train_decoder=false.")

    from vpt.heads import MultiLevelDecoder, PatchTokenDecoder, evenly_spaced_blocks

    organs = 9  # Synapse: background + 8 organs
    multilevel = MultiLevelDecoder(768, organs, evenly_spaced_blocks(12, 4), hidden_dim=128)
    light = PatchTokenDecoder(768, organs, hidden_dim=128)
    print(f"\n| ViT-B/16 segmentation decoder ({organs} classes, task.decoder_dim=128) | trained values |")
    print("|---|---:|")
    print(f"| `multilevel` (default) | {sum(p.numel() for p in multilevel.parameters()):,} |")
    print(f"| `light` | {sum(p.numel() for p in light.parameters()):,} |")


if __name__ == "__main__":
    main()
