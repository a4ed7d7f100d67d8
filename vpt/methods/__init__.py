"""Training methods (config group ``method``): which parts of a backbone train, and how.

A new method is one module here that registers a builder with :func:`register_method`, plus
one config in ``configs/method/``.
"""

from vpt.methods.registry import available_methods, build_method, register_method
from vpt.methods.report import parameter_groups, parameter_table
from vpt.methods.trained_weights import load_trained_weights, save_trained_weights, trainable_state_dict

# Importing the method modules registers them.
from vpt.methods import full, linear, vpt  # noqa: E402,F401  isort: skip

__all__ = [
    "available_methods",
    "build_method",
    "register_method",
    "parameter_groups",
    "parameter_table",
    "load_trained_weights",
    "save_trained_weights",
    "trainable_state_dict",
]
