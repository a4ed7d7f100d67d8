"""Optional Lightning callbacks by name (the ``callbacks`` config group).

``callbacks=[default,early_stopping]`` on the command line merges the named files of
``configs/callbacks/`` into one ``{name: {options}}`` node; each name maps to a Lightning
callback class here, its options being that class's keyword arguments. The checkpointing
callbacks that the run folder depends on (``best.ckpt``, ``last.ckpt``, random states) are
always added by the trainer builder, not through this group.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    RichProgressBar,
    StochasticWeightAveraging,
)

from vpt.errors import ConfigError

__all__ = ["build_callbacks", "available_callbacks", "register_callback"]

CallbackBuilder = Callable[..., Callback]
_CALLBACKS: dict[str, CallbackBuilder] = {
    "lr_monitor": LearningRateMonitor,
    "early_stopping": EarlyStopping,
    "rich_progress_bar": RichProgressBar,
    "swa": StochasticWeightAveraging,
}


def register_callback(name: str, builder: CallbackBuilder) -> None:
    """Make ``callbacks.<name>`` build ``builder(**options)`` (from Python code)."""
    if name in _CALLBACKS:
        raise ValueError(f"callback {name!r} is registered twice")
    _CALLBACKS[name] = builder


def available_callbacks() -> list[str]:
    return sorted(_CALLBACKS)


def build_callbacks(config: Optional[Mapping[str, Any]]) -> list[Callback]:
    """One callback per entry of ``config`` (``{name: {options} | None}``); ``None`` entries are off.

    Raises:
        ConfigError: an unknown name or options the callback does not take.
    """
    callbacks: list[Callback] = []
    for name, options in (config or {}).items():
        if options is None or options is False:
            continue
        if name not in _CALLBACKS:
            raise ConfigError(f"Unknown callback {name!r}; choose from {available_callbacks()} (callbacks=[...]).")
        try:
            callbacks.append(_CALLBACKS[name](**dict(options if isinstance(options, Mapping) else {})))
        except TypeError as error:
            raise ConfigError(f"callbacks.{name}: {error}; see the Lightning documentation of that callback for its options.") from None
    return callbacks
