"""Segmentation heads against segment-anything's own decoder."""

from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from vpt.heads import PatchTokenDecoder, SamMulticlassDecoder, decode_masks

DIM, GRID = 32, 8


def _sam_parts() -> tuple[MaskDecoder, PromptEncoder]:
    torch.manual_seed(0)
    decoder = MaskDecoder(
        transformer_dim=DIM,
        transformer=TwoWayTransformer(depth=2, embedding_dim=DIM, mlp_dim=64, num_heads=2),
        num_multimask_outputs=3,
        iou_head_hidden_dim=32,
    )
    prompts = PromptEncoder(embed_dim=DIM, image_embedding_size=(GRID, GRID), input_image_size=(GRID * 16, GRID * 16), mask_in_chans=4)
    return decoder, prompts


def test_decode_masks_matches_segment_anything_for_each_image() -> None:
    decoder, prompts = _sam_parts()
    embeddings = torch.randn(3, DIM, GRID, GRID)
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [0.0, 0.0, 30.0, 30.0], [40.0, 50.0, 120.0, 100.0]])
    sparse, dense = prompts(points=None, boxes=boxes, masks=None)
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    ours = decode_masks(decoder, embeddings, prompts.get_dense_pe(), tokens, decoder.output_hypernetworks_mlps, sparse, dense)
    for index in range(3):  # the package decodes one image with its prompt set at a time
        theirs, _ = decoder.predict_masks(embeddings[index : index + 1], prompts.get_dense_pe(), sparse[index : index + 1], dense[index : index + 1])
        torch.testing.assert_close(ours[index : index + 1], theirs, rtol=1e-4, atol=1e-5)


def test_multiclass_decoder_starts_from_the_pretrained_tokens() -> None:
    decoder, prompts = _sam_parts()
    head = SamMulticlassDecoder(decoder, prompts, num_classes=6)
    embeddings = torch.randn(2, DIM, GRID, GRID)
    logits = head(embeddings)
    assert logits.shape == (2, 6, 4 * GRID, 4 * GRID)
    # Class i reuses pretrained mask token i mod 4: with no prompts, classes 0 and 4 agree.
    torch.testing.assert_close(logits[:, 0], logits[:, 4])
    # With as many classes as SAM has mask tokens it is the package's decoder without prompts.
    four = SamMulticlassDecoder(decoder, prompts, num_classes=4)(embeddings[:1])
    empty = torch.zeros(1, 0, DIM)
    no_mask = prompts.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, GRID, GRID)
    theirs, _ = decoder.predict_masks(embeddings[:1], prompts.get_dense_pe(), empty, no_mask)
    torch.testing.assert_close(four, theirs, rtol=1e-4, atol=1e-5)
    logits.sum().backward()
    assert head.class_tokens.grad is not None and head.class_tokens.grad.abs().sum() > 0
    assert not any("iou_prediction_head" in n for n, _ in head.named_parameters())


def test_patch_token_decoder_shapes_and_grid_check() -> None:
    head = PatchTokenDecoder(embed_dim=48, num_classes=9, hidden_dim=32)
    logits = head(torch.randn(2, 6 * 5, 48), grid=(6, 5))
    assert logits.shape == (2, 9, 24, 20)
    try:
        head(torch.randn(2, 29, 48), grid=(6, 5))
    except ValueError as error:
        assert "6x5" in str(error)
    else:
        raise AssertionError("a token count that does not fill the grid must fail")
