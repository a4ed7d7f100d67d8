"""Methods (config group ``method``): how a frozen encoder is adapted.

A method is a transform of an encoder (timm ViT or SAM image encoder), applied the same way
for every task: :func:`apply_method`. A new method is one module here (a dataclass config
and a function registered with :func:`register_method`) plus one config in
``configs/method/``; nothing else needs to know it.
"""

from vpt.methods.registry import (
    MethodConfig,
    applied_method,
    apply_method,
    available_methods,
    build_method,
    method_config,
    options_of,
    register_method,
)
from vpt.methods.report import parameter_groups, parameter_table
from vpt.methods.trained_weights import load_trained_weights, save_trained_weights, trainable_state_dict

# Importing the method modules registers them.
from vpt.methods import adapter, bitfit, full, linear, lora, partial, vpt  # noqa: E402,F401  isort: skip
from vpt.methods.lora import merge_lora  # noqa: E402  isort: skip

__all__ = [
    "MethodConfig",
    "applied_method",
    "apply_method",
    "available_methods",
    "build_method",
    "method_config",
    "merge_lora",
    "options_of",
    "register_method",
    "parameter_groups",
    "parameter_table",
    "load_trained_weights",
    "save_trained_weights",
    "trainable_state_dict",
]
