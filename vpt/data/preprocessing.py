"""A trained model's preprocessing, resolved to numbers and saved with its weights.

Training decides how an image or a scan becomes the model's input: the input size and the
normalisation, for scans also the intensity rule (a CT window in HU, or each volume scaled by
its 0.5/99.5 percentiles, with the modality that decided it when ``window: auto``), the 2.5D
context slices, the pixel size the slices are resampled to and the tiles. :class:`Preprocessing`
holds those decisions as plain values, together with the class names by output index. The
training entry point writes it into the trained-weights metadata (key ``preprocessing``) and
into the run folder (``preprocessing.json``); prediction rebuilds the model and its inputs
from it alone, so a trained model predicts on a machine without the training data folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from vpt.errors import CheckpointError, ConfigError

__all__ = ["PREPROCESSING_FILE", "PREPROCESSING_VERSION", "Preprocessing"]

#: The run folder's copy of the preprocessing (the weights file's metadata holds the same).
PREPROCESSING_FILE = "preprocessing.json"
#: Bumped when a field changes meaning; :meth:`Preprocessing.from_dict` refuses newer versions.
PREPROCESSING_VERSION = 1

_TASKS = ("segmentation", "classification")


def _pair(value: Optional[Sequence[Any]], cast: type = float) -> Optional[tuple[Any, Any]]:
    return None if value is None else (cast(value[0]), cast(value[1]))


@dataclass(frozen=True)
class Preprocessing:
    """What turns an input into the model's input, as numbers, and what the outputs are called.

    Attributes:
        task: ``"segmentation"`` or ``"classification"``.
        image_size: ``(H, W)`` the model takes.
        mean: Normalisation mean per RGB channel, in [0, 1] units.
        std: Normalisation standard deviation per RGB channel.
        class_names: Class names by output index (segmentation: background first).
        intensity: Segmentation: ``"raw"`` (scanner units, mapped to [0, 1] by ``window``) or
            ``"unit"`` (the layout's images are already in [0, 1] and are only clipped, as
            Synapse slices and 2D folders are).
        window: Segmentation: the CT window ``(low, high)`` in HU that maps raw scans to
            [0, 1] (training's raw cases, and every scan given to ``vpt-predict``); ``None``
            scales each volume by its 0.5/99.5 percentiles instead.
        modality: The first channel's modality from the data set's ``dataset.json`` (what
            decided ``window: auto``), ``None`` when it says none.
        context_slices: 0 (one slice as the three channels) or 1 (slices z-1, z, z+1).
        spacing: In-plane pixel size ``(y, x)`` in mm slices are resampled to; ``None`` keeps
            the scan's.
        patch_size: Tile side ``(H, W)`` in resampled pixels; ``None`` for whole slices.
        tile_overlap: Overlap of neighbouring tiles when whole slices are predicted.
        sliced: Whether the run's data module cut volumes into slices with a geometry (the
            four fields above); ``False``: one slice, whole, as a 2D data module gives it.
        orientation: How volumes become arrays: ``"stored"``, the file's own voxel order as
            ``(z, y, x)`` (the one reader, :func:`vpt.data.medical.io.read_image`), never
            reoriented to RAS or LPS; predictions are written back on the input's own grid.
        binary_255_as_1: Segmentation with two classes, whose data module reads label files
            storing only 0/255 as 0/1 (class index = label value otherwise).
    """

    task: str
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    intensity: str = "raw"
    window: Optional[tuple[float, float]] = None
    modality: Optional[str] = None
    context_slices: int = 0
    spacing: Optional[tuple[float, float]] = None
    patch_size: Optional[tuple[int, int]] = None
    tile_overlap: float = 0.5
    sliced: bool = False
    orientation: str = "stored"
    binary_255_as_1: bool = False

    @property
    def num_classes(self) -> int:
        """How many outputs the model has."""
        return len(self.class_names)

    def geometry(self) -> Any:
        """The :class:`~vpt.data.medical.slicing.SliceGeometry` of a segmentation run (``None``
        when its data module had none)."""
        from vpt.data.medical.slicing import SliceGeometry

        if not self.sliced:
            return None
        return SliceGeometry(self.image_size, self.context_slices, self.spacing, self.patch_size, self.tile_overlap)

    # -- building and saving --------------------------------------------------------------------

    @classmethod
    def from_datamodule(cls, task: str, datamodule: Any, metadata: Mapping[str, Any]) -> "Preprocessing":
        """The preprocessing a run's data module applies, with the model's input settings.

        Args:
            task: ``"segmentation"`` or ``"classification"``.
            datamodule: The run's data module. A volume data module gives its intensity rule
                (resolving ``window: auto`` from ``dataset.json``) and its slice geometry; any
                other gives only what the model's settings say.
            metadata: The task's model metadata (``input_size``, ``mean``, ``std`` the model
                passed to the data module, ``class_names``).

        Raises:
            ConfigError: Settings that are not numbers of the expected length.
        """
        try:
            common = dict(
                task=task,
                image_size=_pair(list(metadata["input_size"])[-2:], int),
                mean=tuple(float(v) for v in metadata["mean"]),
                std=tuple(float(v) for v in metadata["std"]),
                class_names=tuple(str(name) for name in metadata["class_names"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ConfigError(f"The run's model settings cannot be saved as its preprocessing ({error!r}); report this with the run's config.yaml.") from None
        if task != "segmentation":
            return cls(**common)  # type: ignore[arg-type]
        intensity = "raw"
        case_index = getattr(datamodule, "case_index", None)
        if callable(case_index):
            intensity = str(case_index().intensity)
        resolve = getattr(datamodule, "resolved_window", None)
        window = resolve() if callable(resolve) else getattr(datamodule, "window", None)
        modality = None
        root = getattr(datamodule, "root", None)
        if root is not None and Path(root, "dataset.json").is_file():
            from vpt.data.medical.layouts import dataset_modality

            modality = dataset_modality(root)
        geometry = getattr(datamodule, "geometry", None)
        return cls(
            **common,  # type: ignore[arg-type]
            intensity=intensity,
            window=_pair(window),
            modality=modality,
            context_slices=int(geometry.context_slices) if geometry is not None else 0,
            spacing=_pair(geometry.spacing) if geometry is not None else None,
            patch_size=_pair(geometry.patch_size, int) if geometry is not None else None,
            tile_overlap=float(geometry.tile_overlap) if geometry is not None else 0.5,
            sliced=geometry is not None,
            binary_255_as_1=len(common["class_names"]) == 2,  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, with the format version."""
        values = asdict(self)
        values = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
        return {"version": PREPROCESSING_VERSION, **values}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "the trained weights") -> "Preprocessing":
        """Read :meth:`to_dict`'s values back.

        Raises:
            CheckpointError: A newer version, an unknown task or missing fields, naming ``source``.
        """
        version = values.get("version")
        if not isinstance(version, int) or version > PREPROCESSING_VERSION:
            raise CheckpointError(
                f"{source} holds preprocessing version {version!r}, which this vpt does not know "
                f"(it reads up to {PREPROCESSING_VERSION}); update vpt to predict with it."
            )
        missing = [key for key in ("task", "image_size", "mean", "std", "class_names") if key not in values]
        if missing or values["task"] not in _TASKS:
            raise CheckpointError(
                f"{source} holds an incomplete preprocessing record (missing {missing or 'a known task'}); "
                "predict with run_dir=<its run folder> instead."
            )
        try:
            record = cls(
                task=str(values["task"]),
                image_size=_pair(values["image_size"], int),  # type: ignore[arg-type]
                mean=tuple(float(v) for v in values["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in values["std"]),  # type: ignore[arg-type]
                class_names=tuple(str(name) for name in values["class_names"]),
                intensity=str(values.get("intensity", "raw")),
                window=_pair(values.get("window")),
                modality=values.get("modality"),
                context_slices=int(values.get("context_slices", 0)),
                spacing=_pair(values.get("spacing")),
                patch_size=_pair(values.get("patch_size"), int),
                tile_overlap=float(values.get("tile_overlap", 0.5)),
                sliced=bool(values.get("sliced", False)),
                orientation=str(values.get("orientation", "stored")),
                binary_255_as_1=bool(values.get("binary_255_as_1", False)),
            )
        except (TypeError, ValueError, IndexError) as error:
            raise CheckpointError(f"{source} holds a preprocessing record that is not valid ({error}); predict with run_dir=<its run folder> instead.") from None
        if record.orientation != "stored":
            raise CheckpointError(f"{source} holds volumes oriented {record.orientation!r}, which this vpt does not read that way; update vpt to predict with it.")
        if len(record.mean) != 3 or len(record.std) != 3 or record.intensity not in ("raw", "unit") or not record.class_names:
            raise CheckpointError(f"{source} holds a preprocessing record that is not valid (mean/std of 3, intensity raw or unit, class names); predict with run_dir=<its run folder> instead.")
        return record

    def write(self, folder: Path) -> Path:
        """Write ``preprocessing.json`` into ``folder`` (atomically); returns its path."""
        from vpt.atomic import atomic_write_text

        path = Path(folder) / PREPROCESSING_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path
