"""Several tasks' prompts on one frozen ViT, served in one encoder pass.

VPT leaves the backbone untouched, so tasks trained on the same backbone differ only in
their prompt tokens and heads. The prompted ViT already takes per-sample prompts (deep
prompts as per-sample keys and values, shallow prompts concatenated per sample), so a batch
that mixes tasks runs through the encoder once, each sample with its own task's prompts,
and only the small heads run per task. Each sample's logits equal those of its task run
alone (tests/test_prompt_bank.py checks it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from vpt.errors import CheckpointError, ConfigError
from vpt.prompts.vit import PromptedViT

__all__ = ["PromptBank", "PromptTask"]

_logger = logging.getLogger(__name__)

# The methods whose files differ from each other only in prompts (and head): the encoder
# is the same for all of them, so their samples can share a pass.
_PROMPT_METHODS = ("vpt_deep", "vpt_shallow")


@dataclass
class PromptTask:
    """One task of a bank.

    Args:
        name: How the task is called in :meth:`PromptBank.forward_all`'s result.
        prompts: Prompt tokens at the model's width, (S, T, D): S = depth (deep) or 1
            (shallow), already through the task's projection if it had one.
        head: The task's classifier on pooled features, (B, D) -> (B, C_task).
        gates: Gated deep prompts (``method.gate``): the task's gate logits, (depth, heads);
            None for the paper's ungated prompts.
    """

    name: str
    prompts: torch.Tensor
    head: nn.Module
    gates: Optional[torch.Tensor] = None


class PromptBank(nn.Module):
    """Prompt sets and heads of several tasks on one frozen prompted ViT.

    Args:
        encoder: A :class:`PromptedViT` (``apply_method(vit, "vpt_deep"|"vpt_shallow",
            num_tokens=T)``); its own prompts and head are not used, its trunk is frozen.
        tasks: The tasks, each with prompts of shape (S, T, D) matching ``encoder``.

    Raises:
        ConfigError: a SAM encoder, no tasks, duplicate names, or prompts that do not fit.
    """

    def __init__(self, encoder: PromptedViT, tasks: Sequence[PromptTask]) -> None:
        super().__init__()
        from vpt.families import family_of

        if not family_of(encoder).supports("classification"):
            raise ConfigError(
                f"PromptBank serves classification prompts; {family_of(encoder).name} encoders do not classify, "
                "run each of their prompt files with its own model."
            )
        if not isinstance(encoder, PromptedViT) or encoder.num_tokens == 0:
            raise ConfigError(
                f"PromptBank needs a PromptedViT with prompts, got {type(encoder).__name__}; "
                'build it with vpt.apply_method(vit, "vpt_deep" or "vpt_shallow", num_tokens=T).'
            )
        if not tasks:
            raise ConfigError("PromptBank needs at least one task; pass one prompt file per task.")
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"Task names must be unique, got {names}; give each task its own name.")
        sets = len(encoder.vit.blocks) if encoder.deep else 1
        expected = (sets, encoder.num_tokens, encoder.embed_dim)
        for task in tasks:
            if tuple(task.prompts.shape) != expected:
                raise ConfigError(
                    f"Task {task.name!r} has prompts of shape {tuple(task.prompts.shape)} but the encoder takes "
                    f"{expected}; every task needs the encoder's method, num_tokens and width "
                    "(banks of different token counts are not supported)."
                )
        gated = encoder.prompt_gates is not None
        for task in tasks:
            if (task.gates is not None) != gated or (gated and tuple(task.gates.shape) != tuple(encoder.prompt_gates.shape)):
                raise ConfigError(
                    f"Task {task.name!r} is {'un' if task.gates is None else ''}gated but the encoder is "
                    f"{'' if gated else 'un'}gated; put files trained with one method.gate setting in a bank."
                )
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.task_names = names
        # (N, depth, heads) for gated prompts: each sample gets its task's gates too.
        gates = torch.stack([task.gates.detach() for task in tasks]) if gated else None  # type: ignore[union-attr]
        self.register_buffer("task_gates", gates, persistent=True)
        # (N, S, T, D): indexed by task id to give each sample its prompts.
        self.register_buffer("task_prompts", torch.stack([task.prompts.detach() for task in tasks]), persistent=True)
        self.heads = nn.ModuleList(task.head for task in tasks)
        self.heads.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PromptBank":
        """A bank only serves trained tasks: it stays in eval mode (no dropout) whatever ``mode``."""
        return super().train(False)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def task_index(self, name: str) -> int:
        """The task id of ``name`` (its position in :attr:`task_names`)."""
        if name not in self.task_names:
            raise ConfigError(f"No task {name!r} in this bank; choose one of {self.task_names}.")
        return self.task_names.index(name)

    def features(self, images: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Pooled features of a mixed batch, each sample with its task's prompts.

        Args:
            images: (B, 3, H, W).
            task_ids: (B,) long, each in [0, num_tasks).

        Returns:
            (B, D) pooled features (timm's ``forward_head(pre_logits=True)``).
        """
        task_ids = self._check_task_ids(task_ids, images.shape[0]).to(self.task_prompts.device)
        prompt_sets = self.task_prompts[task_ids].to(images.dtype)
        gate_sets = self.task_gates[task_ids] if self.task_gates is not None else None
        tokens = self.encoder.forward_features(images, prompt_sets=prompt_sets, gate_sets=gate_sets)
        return self.encoder.forward_head(tokens, pre_logits=True)

    def forward(self, images: torch.Tensor, task_ids: torch.Tensor) -> list[torch.Tensor]:
        """Logits of a mixed-task batch from one encoder pass.

        Args:
            images: (B, 3, H, W).
            task_ids: (B,) long; sample i is run as task ``task_names[task_ids[i]]``.

        Returns:
            B tensors; entry i holds sample i's logits, (C_task,) for its task.
        """
        features = self.features(images, task_ids)
        logits: list[Optional[torch.Tensor]] = [None] * features.shape[0]
        ids = task_ids.to(features.device)
        # One head call per task present, not per sample.
        for task in torch.unique(ids).tolist():
            rows = torch.nonzero(ids == task).flatten()
            for row, row_logits in zip(rows.tolist(), self.heads[task](features[rows])):
                logits[row] = row_logits
        return logits  # type: ignore[return-value]

    def forward_all(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every task on every image, in one encoder pass of N * B samples.

        Args:
            images: (B, 3, H, W).

        Returns:
            Task name -> logits (B, C_task).
        """
        batch = images.shape[0]
        task_ids = torch.arange(self.num_tasks, device=images.device).repeat_interleave(batch)
        features = self.features(images.repeat(self.num_tasks, 1, 1, 1), task_ids)
        return {
            name: head(features[index * batch : (index + 1) * batch])
            for index, (name, head) in enumerate(zip(self.task_names, self.heads))
        }

    def _check_task_ids(self, task_ids: torch.Tensor, batch: int) -> torch.Tensor:
        if task_ids.dtype not in (torch.int64, torch.int32) or tuple(task_ids.shape) != (batch,):
            raise ConfigError(
                f"task_ids must be an integer tensor of shape ({batch},), got {task_ids.dtype} "
                f"{tuple(task_ids.shape)}; pass one task id per image."
            )
        if batch and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.num_tasks):
            raise ConfigError(
                f"task_ids must lie in [0, {self.num_tasks}), got {task_ids.min().item()}..{task_ids.max().item()}; "
                f"ids index {self.task_names}."
            )
        return task_ids.long()

    @classmethod
    def from_files(
        cls,
        vit: nn.Module,
        paths: Sequence[str | Path],
        names: Optional[Sequence[str]] = None,
        backbone: Optional[str] = None,
    ) -> "PromptBank":
        """A bank from classification trained-weights files of one backbone.

        Args:
            vit: The frozen backbone with its pretrained weights: a timm
                ``VisionTransformer`` (the files' prompt method is applied to it) or a
                :class:`PromptedViT` already built with that method and ``num_tokens``.
            paths: ``prompts.safetensors`` files (:func:`vpt.methods.save_trained_weights`),
                all ``vpt_deep`` or all ``vpt_shallow`` with the same ``num_tokens`` and
                backbone name.
            names: Task names, one per file; default the file stems, or the full paths
                when stems repeat (every run writes ``prompts.safetensors``).
            backbone: If given, the backbone name every file must record.

        Returns:
            The bank, in eval mode; task id i is ``paths[i]``.

        Raises:
            CheckpointError: a file that is unreadable, of another method, token count or
                backbone, without a classification head, or with tensors of wrong shape.
        """
        from safetensors.torch import load_file

        from vpt.methods import apply_method
        from vpt.methods.trained_weights import read_trained_metadata

        paths = [Path(path) for path in paths]
        if not paths:
            raise ConfigError("PromptBank.from_files needs at least one file; pass one prompts.safetensors per task.")
        if names is None:
            stems = [path.stem for path in paths]
            names = stems if len(set(stems)) == len(stems) else [str(path) for path in paths]
        if len(names) != len(paths):
            raise ConfigError(f"Got {len(names)} names for {len(paths)} files; give one name per file.")

        metadata = [read_trained_metadata(path) for path in paths]
        first_path, first = paths[0], metadata[0]
        method, num_tokens, gate = first.get("method"), _num_tokens(first), _gated(first)
        expected_backbone = backbone if backbone is not None else first.get("backbone")
        for path, meta in zip(paths, metadata):
            if meta.get("method") not in _PROMPT_METHODS:
                raise CheckpointError(
                    f"{path} was trained with method={meta.get('method')}, but a prompt bank takes only "
                    f"{' or '.join(_PROMPT_METHODS)} files; run it on its own model instead."
                )
            if meta.get("method") != method:
                raise CheckpointError(
                    f"{path} was trained with method={meta.get('method')} but {first_path} with method={method}; "
                    "put files of one prompt method in a bank."
                )
            if _num_tokens(meta) != num_tokens:
                raise CheckpointError(
                    f"{path} has num_tokens={_num_tokens(meta)} but {first_path} has num_tokens={num_tokens}; "
                    "a bank takes files of one token count (build one bank per count)."
                )
            if _gated(meta) != gate:
                raise CheckpointError(
                    f"{path} was trained with method.gate={_gated(meta)} but {first_path} with method.gate={gate}; "
                    "a bank takes files of one gate setting."
                )
            if meta.get("backbone") != expected_backbone:
                raise CheckpointError(
                    f"{path} was trained on backbone={meta.get('backbone')}, not {expected_backbone}; "
                    "a bank takes files of one backbone."
                )
            # Same name is not same weights: files that record their base encoder must share it.
            fingerprint = (meta.get("base_encoder") or {}).get("fingerprint")
            first_fingerprint = (first.get("base_encoder") or {}).get("fingerprint")
            if fingerprint and first_fingerprint and fingerprint != first_fingerprint:
                raise CheckpointError(
                    f"{path} was trained on another base encoder than {first_path} (fingerprint {fingerprint[:12]} vs "
                    f"{first_fingerprint[:12]}, both {expected_backbone}); a bank takes files trained on the same weights."
                )

        deep = method == "vpt_deep"
        if isinstance(vit, PromptedViT):
            encoder = vit
            if encoder.deep != deep or encoder.num_tokens != num_tokens or (encoder.prompt_gates is not None) != gate:
                raise CheckpointError(
                    f"{first_path} holds method={method} num_tokens={num_tokens} gate={gate} prompts, but the given model has "
                    f"deep={encoder.deep} num_tokens={encoder.num_tokens} gate={encoder.prompt_gates is not None}; "
                    "pass the plain timm ViT instead."
                )
        else:
            encoder = apply_method(vit, method, num_tokens=num_tokens, **({"gate": True} if gate else {}))
            if not isinstance(encoder, PromptedViT):
                raise ConfigError(
                    f"PromptBank serves timm ViTs only, got {type(vit).__name__}; SAM prompt files are not supported."
                )

        tasks = [
            _task_from_tensors(name, path, load_file(str(path)), encoder) for name, path in zip(names, paths)
        ]
        _logger.info("Prompt bank of %d %s tasks (%d tokens): %s", len(tasks), method, num_tokens, list(names))
        return cls(encoder, tasks)


def _method_options(metadata: dict[str, Any]) -> dict[str, Any]:
    options = metadata.get("method_options")
    if isinstance(options, str):  # older files may keep it as a JSON string
        options = json.loads(options)
    return options or {}


def _num_tokens(metadata: dict[str, Any]) -> Optional[int]:
    return _method_options(metadata).get("num_tokens")


def _gated(metadata: dict[str, Any]) -> bool:
    return bool(_method_options(metadata).get("gate", False))


def _task_from_tensors(name: str, path: Path, tensors: dict[str, torch.Tensor], encoder: PromptedViT) -> PromptTask:
    """A task from one file's tensors: prompts through the file's own projection, its gates
    (gated prompts), and its head."""
    if ("prompt_gates" in tensors) != (encoder.prompt_gates is not None):
        raise CheckpointError(
            f"{path} {'holds' if 'prompt_gates' in tensors else 'has no'} prompt_gates but its metadata says "
            f"method.gate={encoder.prompt_gates is not None}; the file is damaged, save it again from its run."
        )
    if "vit.head.weight" not in tensors or "prompt_embeddings" not in tensors:
        raise CheckpointError(
            f"{path} has no prompt_embeddings or no classification head (vit.head.weight); a prompt bank takes "
            "classification prompts.safetensors files."
        )
    prompts = tensors["prompt_embeddings"].float()
    if "prompt_proj.weight" in tensors:
        projection = nn.Linear(prompts.shape[-1], tensors["prompt_proj.weight"].shape[0])
        projection.load_state_dict({"weight": tensors["prompt_proj.weight"], "bias": tensors["prompt_proj.bias"]})
        with torch.no_grad():
            prompts = projection(prompts)
    weight = tensors["vit.head.weight"]
    sets = len(encoder.vit.blocks) if encoder.deep else 1
    expected = (sets, encoder.num_tokens, encoder.embed_dim)
    if tuple(prompts.shape) != expected or weight.shape[1] != encoder.num_features:
        raise CheckpointError(
            f"{path} has prompts {tuple(prompts.shape)} and head {tuple(weight.shape)}, but the backbone takes prompts "
            f"{expected} and a head on {encoder.num_features} features; pass the backbone the file was trained on."
        )
    head = nn.Linear(weight.shape[1], weight.shape[0], bias="vit.head.bias" in tensors)
    head.weight.data.copy_(weight)
    if head.bias is not None:
        head.bias.data.copy_(tensors["vit.head.bias"])
    param = next(encoder.parameters())
    gates = tensors["prompt_gates"].to(param.device, param.dtype) if "prompt_gates" in tensors else None
    return PromptTask(name, prompts.to(param.device, param.dtype), head.to(param.device, param.dtype), gates)
