"""Lightning checkpoints that are safe to load, written atomically, and resumable exactly.

- :func:`load_checkpoint_file` is the one place vpt reads a Lightning checkpoint a user
  hands it (``ckpt_path=``, ``best.ckpt`` for testing, ``vpt-evaluate checkpoint=``): a
  local file only, read with ``torch.load(weights_only=True)`` passed explicitly (an
  explicit ``True`` wins over the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` escape hatch), every
  failure turned into one sentence.
- :class:`SafeCheckpointIO` is the Lightning plugin through which the Trainer saves
  (atomically) and loads (through :func:`load_checkpoint_file`) checkpoints, so Lightning
  never unpickles a file itself.
- :class:`LastCheckpoint` rewrites ``last.ckpt`` after every epoch (Lightning's
  ``save_last`` only does so when the monitored metric improves) and on an interrupt.
- :class:`RandomState` stores the random generators in every checkpoint and restores them
  when training resumes, so that a resumed ``deterministic=true`` run draws the same data
  order, augmentations and prompt dropout as an uninterrupted one.
- :class:`WallTime` stores the wall time of the run's segments so far in every checkpoint,
  so a resumed run reports the time of all its segments, not only of the last.
- :func:`check_resume_fits` compares a checkpoint's recorded run with the run that wants to
  resume it, before anything is built or written.
- :func:`load_checkpoint_weights` puts a checkpoint's trained tensors into a task module
  rebuilt from a run config, for scoring it, after checking that they fit.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from vpt.atomic import atomic_path
from vpt.errors import CheckpointError

__all__ = [
    "load_checkpoint_file",
    "state_fit_problems",
    "SafeCheckpointIO",
    "LastCheckpoint",
    "RandomState",
    "WallTime",
    "check_resume_fits",
    "checkpoint_step",
    "load_checkpoint_weights",
]

_logger = logging.getLogger(__name__)

_REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "gcs://", "hf://", "ftp://", "file://")


#: What a checkpoint is read for: resuming a run (``vpt-train ckpt_path=``) or scoring it
#: (``vpt-evaluate checkpoint=``); the messages name that tool's argument and fix.
CheckpointUse = Literal["resume", "evaluate"]

# (where to find a good checkpoint, what to do instead of using this one), by use.
_FIXES: dict[str, tuple[str, str]] = {
    "resume": (
        "pass ckpt_path=<run folder>/checkpoints/last.ckpt of an earlier run",
        "resume from another one (e.g. best.ckpt) or start a new run",
    ),
    "evaluate": (
        "pass checkpoint=best, checkpoint=last or the path of a .ckpt written by vpt-train",
        "evaluate another one (checkpoint=best or checkpoint=last) or the run's trained weights (no checkpoint=)",
    ),
}


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", use: CheckpointUse = "resume") -> dict[str, Any]:
    """Read a Lightning checkpoint safely.

    Args:
        path: A local ``.ckpt`` file (URLs are refused: download the file and pass its path).
        map_location: Passed to ``torch.load``.
        use: What the checkpoint is for, so that a refusal names the right fix.

    Returns:
        The checkpoint dictionary.

    Raises:
        CheckpointError: remote, missing, empty, truncated, not a checkpoint, or holding
            objects other than tensors and plain values.
    """
    where, instead = _FIXES[use]
    argument = "ckpt_path" if use == "resume" else "checkpoint"
    text = str(path)
    if text.lower().startswith(_REMOTE_PREFIXES) or "://" in text:
        raise CheckpointError(
            f"{argument}={text} is a URL; vpt only reads local checkpoints it can check, so download it and pass its path."
        )
    file = Path(text).expanduser()
    if not file.exists():
        raise CheckpointError(f"Checkpoint {file} does not exist; {where}.")
    if not file.is_file():
        raise CheckpointError(f"Checkpoint {file} is not a file; {where}.")
    if file.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {file} is empty (0 bytes), probably from a crash while it was written; {instead}.")
    if not zipfile.is_zipfile(file):
        # torch.save writes a zip archive; anything else (a cut-off file, another format) would
        # reach torch's legacy unpickler and read as "unsafe objects", which it is not.
        raise CheckpointError(
            f"Checkpoint {file} cannot be read (not a complete torch archive); it is truncated or not a checkpoint, so {instead}."
        )
    try:
        # weights_only=True is passed explicitly on purpose: an explicit value is not
        # overridden by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, so no environment turns this
        # into an unpickler that runs code.
        checkpoint = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(error)
        if reason.startswith("Unsupported operand"):  # bytes no pickle writes: a damaged file
            raise CheckpointError(
                f"Checkpoint {file} cannot be read ({reason}); it is damaged or not a checkpoint, so {instead}."
            ) from None
        raise CheckpointError(
            f"Checkpoint {file} holds objects other than tensors and plain values ({reason}); vpt refuses to unpickle "
            "it, so use only checkpoints written by vpt."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as error:
        reason = _first_sentence(str(error)) or "truncated"
        raise CheckpointError(
            f"Checkpoint {file} cannot be read ({type(error).__name__}: {reason}); "
            f"it is truncated or not a checkpoint, so {instead}."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{file} is not a Lightning checkpoint (no state_dict); {where}.")
    return checkpoint


def _first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence of the first line of an error's text, cut at a word if still long."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    sentence = line.split(". ", 1)[0].rstrip(".")
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused (``Unsupported global: GLOBAL x.y was not
    an allowed global by default``, ``Unsupported operand 255``), without torch's advice
    around it (which names the unsafe ``weights_only=False``)."""
    _, found, reason = str(error).partition("WeightsUnpickler error:")
    return _first_sentence(reason if found else str(error)) or type(error).__name__


def checkpoint_step(checkpoint: Mapping[str, Any]) -> int:
    """The global step a checkpoint was saved at."""
    return int(checkpoint.get("global_step", 0) or 0)


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O with atomic saves and :func:`load_checkpoint_file` loads.

    Args:
        preloaded: Checkpoints already read (path -> dictionary), so a checkpoint checked
            before training is not read twice.
    """

    def __init__(self, preloaded: Optional[dict[str, dict[str, Any]]] = None) -> None:
        self._preloaded = {str(Path(k).resolve()): v for k, v in (preloaded or {}).items()}

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    @override
    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        key = str(Path(str(path)).resolve()) if "://" not in str(path) else str(path)
        if key in self._preloaded:
            return self._preloaded.pop(key)
        return load_checkpoint_file(path)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        file = Path(str(path))
        if file.is_file():
            file.unlink()


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after every training epoch (validation included) and on an interrupt.

    A checkpoint written at an epoch's end resumes exactly; one written on an interrupt
    (Ctrl-C, or SIGTERM as schedulers send before preempting; single-process runs) resumes at its step, with the rest of that epoch's batches drawn
    anew. Other exceptions (a bug, a NaN loss) do not overwrite the last good checkpoint.
    """

    def __init__(self, dirpath: str | Path) -> None:
        super().__init__(
            dirpath=str(dirpath),
            filename="last",
            monitor=None,
            save_top_k=1,
            every_n_epochs=1,
            # Every epoch, even when validation runs only every n epochs (it runs before
            # on_train_epoch_end when it does, so the checkpoint includes it).
            save_on_train_epoch_end=True,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )

    @property
    @override
    def state_key(self) -> str:
        return "LastCheckpoint"

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.sanity_checking or trainer.global_step == 0:
            return
        if trainer.world_size > 1:
            return  # the other processes may be anywhere: saving waits on a barrier they never reach
        if self._last_global_step_saved == trainer.global_step:
            return
        self._save_checkpoint(trainer, str(Path(self.dirpath) / "last.ckpt"))
        _logger.info("Interrupted at step %d; saved %s.", trainer.global_step, Path(self.dirpath) / "last.ckpt")


def _python_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _numpy_state() -> dict[str, Any]:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached": float(cached)}


class RandomState(Callback):
    """Save the random generators with every checkpoint; restore them when training resumes.

    The states are restored as soon as Lightning restores the callbacks, before it builds
    the training iterator, which is where an uninterrupted run stands at that epoch
    boundary. Lightning's sanity-check validation draws from the generators too, so it runs
    between a save and a restore of them. Stored as tensors and plain values, so the
    checkpoint still loads with ``weights_only=True``.
    """

    def __init__(self) -> None:
        self._stash: Optional[dict[str, Any]] = None

    @staticmethod
    def _capture() -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_state(), "numpy": _numpy_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def _restore(state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        python = state["python"]
        random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss"]))
        numpy = state["numpy"]
        np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"], numpy["cached"]))
        if "cuda" in state and torch.cuda.is_available():
            for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, device)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._capture()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._restore(state_dict)

    @override
    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        self._stash = self._capture()

    @override
    def on_sanity_check_end(self, trainer: Any, pl_module: Any) -> None:
        if self._stash is not None:
            self._restore(self._stash)
            self._stash = None

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        # albumentations keeps its own generator inside each Compose; in the main process
        # (num_workers=0) it would carry on between epochs and restart from its seed on
        # resume. Seeding it from (run seed, epoch) makes the augmentations a function of
        # the epoch, without drawing from the global generators. Workers reseed themselves.
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        transform = getattr(dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_seed"):
            run_seed = int(os.environ.get("PL_GLOBAL_SEED", "0") or 0)
            # The rank too: DDP processes must not draw the same crops for their samples.
            seed = (run_seed * 1_000_003 + trainer.current_epoch) * 1009 + trainer.global_rank
            transform.set_random_seed(seed % 2**32)


class WallTime(Callback):
    """The wall time of a run's segments (the first run and each resume), in every checkpoint.

    A checkpoint holds the seconds of the segments before it and of its own segment up to
    its save; a run resumed from it passes those as ``earlier``. Read from the resumed
    checkpoint once, never restored by Lightning: ``trainer.test(ckpt_path=best.ckpt)``
    restores callbacks too, and would count the run's own segment twice.

    Args:
        started: ``time.time()`` when this segment began.
        earlier: Seconds of each earlier segment (:meth:`earlier_segments` of the resumed
            checkpoint).
    """

    def __init__(self, started: Optional[float] = None, earlier: Sequence[float] = ()) -> None:
        self.started = time.time() if started is None else float(started)
        self.earlier = [float(seconds) for seconds in earlier]

    @staticmethod
    def earlier_segments(checkpoint: Optional[Mapping[str, Any]]) -> list[float]:
        """The segments a checkpoint recorded (``[]`` for none, or one written before vpt kept them)."""
        callbacks = checkpoint.get("callbacks") if isinstance(checkpoint, Mapping) else None
        state = callbacks.get("WallTime") if isinstance(callbacks, Mapping) else None
        segments = state.get("segments_s") if isinstance(state, Mapping) else None
        if not isinstance(segments, (list, tuple)):
            return []
        return [float(seconds) for seconds in segments if isinstance(seconds, (int, float)) and seconds >= 0]

    def segments(self) -> list[float]:
        """Seconds of each segment, this one (up to now) last, rounded to 0.1 s."""
        return [round(seconds, 1) for seconds in (*self.earlier, time.time() - self.started)]

    @property
    @override
    def state_key(self) -> str:
        return "WallTime"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"segments_s": self.segments()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # see the class docstring


def _method_settings(section: Any) -> dict[str, Any]:
    """A method config node as the method sees it: options of other methods (a sweep sets
    them for every job) dropped, defaults filled in."""
    import dataclasses

    from vpt.errors import VptError
    from vpt.methods.registry import method_config, options_of

    section = dict(section or {})
    name = section.get("name")
    try:
        options = dataclasses.asdict(method_config(name, **options_of(section)))  # type: ignore[arg-type]
    except VptError:
        return section
    return {"name": name, **options}


def _describe(section: Any) -> str:
    if isinstance(section, Mapping):
        return " ".join(f"{k}={v}" for k, v in section.items())
    return str(section)


def check_resume_fits(checkpoint: Mapping[str, Any], cfg: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint that was trained with another model, method or task.

    The checkpoint's ``hyper_parameters`` hold the resolved config of the run that wrote
    it; comparing it with this run's config gives a precise sentence before the model is
    built or anything in the run folder is touched. (The tensor names and shapes are
    checked again when Lightning loads the state.)

    Args:
        checkpoint: From :func:`load_checkpoint_file`.
        cfg: This run's resolved config as plain containers.
        path: The checkpoint's path, for the message.

    Raises:
        CheckpointError: the model, the method or its options, or the task differ.
    """
    saved = checkpoint.get("hyper_parameters") or {}
    if not isinstance(saved, Mapping) or "method" not in saved:
        return  # not written by vpt-train; the state-dict check will speak
    from omegaconf import OmegaConf

    from vpt.config_version import migrate_run_config

    # A checkpoint of an older vpt: its config as it is read today (e.g. no task.decoder = light).
    saved = OmegaConf.to_container(migrate_run_config(OmegaConf.create(dict(saved)), str(path)))  # type: ignore[assignment]
    for section, keys in (("model", ("name", "img_size")), ("task", ("name", "decoder"))):
        before, now = saved.get(section) or {}, cfg.get(section) or {}
        for key in keys:
            if before.get(key) != now.get(key):
                raise CheckpointError(
                    f"Checkpoint {path} was trained with {section}.{key}={before.get(key)} but this run has "
                    f"{section}.{key}={now.get(key)}; resume with the settings it was trained with."
                )
    before_optimizer = (saved.get("optimizer") or {}).get("name")
    now_optimizer = (cfg.get("optimizer") or {}).get("name")
    if before_optimizer and now_optimizer and before_optimizer != now_optimizer:
        raise CheckpointError(
            f"Checkpoint {path} was trained with optimizer.name={before_optimizer} but this run has "
            f"optimizer.name={now_optimizer}; resume with optimizer.name={before_optimizer}."
        )
    before_method, now_method = _method_settings(saved.get("method")), _method_settings(cfg.get("method"))
    if before_method != now_method:
        raise CheckpointError(
            f"Checkpoint {path} was trained with method {_describe(before_method)} but this run has "
            f"method {_describe(now_method)}; resume with the method and options it was trained with."
        )


def state_fit_problems(state: Mapping[str, Any], trainable: Mapping[str, torch.Tensor]) -> list[str]:
    """How a checkpoint's tensors miss the ones a model trains, as clauses for one sentence
    ("lacks [...]", "holds tensors this model does not train [...]", "holds tensors of other
    shapes [...]"); empty when they fit exactly."""
    missing = sorted(set(trainable) - set(state))
    extra = sorted(set(state) - set(trainable))
    mis_shaped = [
        f"{name} {tuple(tensor.shape)} vs model {tuple(trainable[name].shape)}"
        for name, tensor in state.items()
        if name in trainable and tuple(getattr(tensor, "shape", ())) != tuple(trainable[name].shape)
    ]
    problems = [f"lacks {missing[:5]}"] if missing else []
    problems += [f"holds tensors this model does not train {extra[:5]}"] if extra else []
    problems += [f"holds tensors of other shapes {mis_shaped[:3]}"] if mis_shaped else []
    return problems


def load_checkpoint_weights(module: nn.Module, checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """Put the trained tensors of a vpt Lightning checkpoint into a task module, for scoring.

    A vpt checkpoint holds exactly the tensors the task trains (``model.<name>``, see
    :class:`vpt.tasks.base.TrainableCheckpointMixin`); the frozen backbone comes from the
    rebuilt module. Nothing is copied unless every tensor fits.

    Args:
        module: The task's LightningModule, rebuilt from the run config (``module.model`` is
            the network).
        checkpoint: From :func:`load_checkpoint_file`.
        path: The checkpoint's path, for the message.

    Raises:
        CheckpointError: trained on another backbone, or tensors missing, extra or of other
            shapes (the first few named).
    """
    state = checkpoint["state_dict"]
    saved_backbone, built_backbone = checkpoint.get("vpt_backbone"), getattr(module, "backbone_id", None)
    if saved_backbone is not None and built_backbone is not None and saved_backbone != built_backbone:
        raise CheckpointError(
            f"Checkpoint {path} was trained on backbone {saved_backbone!r} but the run config builds {built_backbone!r}; "
            "evaluate it with the run it was trained in (run_dir=<its run folder>)."
        )
    network: nn.Module = getattr(module, "model", module)
    prefix = "model." if network is not module else ""
    trainable = {f"{prefix}{name}": param for name, param in network.named_parameters() if param.requires_grad}
    problems = state_fit_problems(state, trainable)
    if problems:
        raise CheckpointError(
            f"Checkpoint {path} does not fit the model of this run config (it {' and '.join(problems)}); evaluate it "
            "with the run it was trained in (run_dir=<its run folder>), whose method and classes built it."
        )
    with torch.no_grad():
        for name, tensor in state.items():
            trainable[name].copy_(tensor.to(trainable[name].dtype))
