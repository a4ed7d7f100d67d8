"""Command-line overrides checked before Hydra runs, so a mistake gets vpt's own sentence.

Hydra answers a mistyped key (``task.data.rooot=/x``) with "To append to your config use
+task.data.rooot=/x": advice that adds a key nothing reads, so the run goes on with the
default folder. Here the config is composed once with the same overrides (Hydra's compose
API: hydra and omegaconf only, no torch) and a failure becomes one sentence with the
closest valid key or config name, never the ``+key`` advice.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from omegaconf import DictConfig

from vpt.errors import ConfigError

__all__ = ["check_overrides", "config_keys", "closest"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Hydra's messages name the failing key or group option in these forms.
_KEY_PATTERNS = (
    re.compile(r"Could not override '([^']+)'"),
    re.compile(r"Could not delete from config\. '([^']+)' does not exist"),
    re.compile(r"Key '([^']+)' (?:is not in struct|not in)"),
)
_MULTIRUN_FLAGS = ("-m", "--multirun")


def config_keys(node: object, prefix: str = "") -> list[str]:
    """Every dotted key of a composed config (interpolations left unresolved)."""
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            keys.append(path)
            child = node._get_node(key)  # the raw node: no interpolation is resolved
            if isinstance(child, DictConfig):
                keys += config_keys(child, path + ".")
    return keys


def closest(word: str, candidates: Iterable[str]) -> Optional[str]:
    """The candidate ``word`` most likely meant (a typo), or ``None``."""
    matches = difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=1, cutoff=0.7)
    return matches[0] if matches else None


def _compose(overrides: Sequence[str], config_name: str) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name=config_name):
            return compose(config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def _first_of_sweeps(overrides: Sequence[str]) -> Optional[list[str]]:
    """One job's overrides of a sweep (the first value of each ``a,b,c``), or ``None`` when a
    sweep is of a kind this check does not expand (ranges, globs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    first: list[str] = []
    for override, text in zip(parsed, overrides):
        if not override.is_sweep_override():
            first.append(text)
            continue
        value = override.value()
        if not isinstance(value, ChoiceSweep) or not value.list:
            return None
        key = text.split("=", 1)[0]
        first.append(f"{key}={type(override)._get_value_element_as_str(value.list[0])}")
    return first


def _extra_candidates(key: str) -> list[str]:
    """Keys ``trainer.X`` / ``method.X`` may name beyond the composed config."""
    head = key.lstrip("+").split(".", 1)[0]
    return [f"{head}.{name}" for name in sorted(_known_names(head))]


def _unknown_key_sentence(key: str, overrides: Sequence[str], config_name: str, tool: str) -> str:
    others = [text for text in overrides if text.split("=", 1)[0].lstrip("+~") != key]
    try:
        keys = config_keys(_compose(others, config_name))
    except Exception:  # another override fails too: suggest from the plain config
        keys = config_keys(_compose([], config_name))
    keys = [k for k in keys if not k.startswith("hydra.")] + _extra_candidates(key)
    guess = closest(key, keys)
    hint = f"; did you mean {guess}?" if guess else ""
    return f"{key} is not a setting of {tool}'s configuration{hint} (`{tool} --cfg job` lists every setting)"


def _missing_option_sentence(error: Exception) -> Optional[str]:
    """``task=volum_seg``: the group, the closest option and the options there are."""
    missing = getattr(error, "missing_cfg_file", None)
    options = getattr(error, "options", None)
    if not missing or options is None:
        return None
    group, _, name = str(missing).rpartition("/")
    if not group:
        return None
    choices = sorted(str(option) for option in options)
    guess = closest(name, choices)
    listed = f"the {group} configs are: {', '.join(choices)}."
    advice = f"did you mean {group}={guess}? {listed[0].upper()}{listed[1:]}" if guess else listed
    return f"{group}={name} is not a {group} config; {advice}"


def _known_names(head: str) -> frozenset[str]:
    """The Trainer arguments or method options ``trainer.X`` / ``method.X`` may name
    (imports torch: asked only when a key is not in the composed config)."""
    if head == "trainer":
        from vpt.training import TRAINER_ARGUMENTS

        return frozenset(TRAINER_ARGUMENTS)
    if head == "method":
        from vpt.methods.registry import _known_options

        return frozenset(_known_options())
    return frozenset()


def _failing_key(error: Exception, job: Sequence[str]) -> Optional[str]:
    text = f"{error} {getattr(error, '__cause__', '') or ''}"
    for pattern in _KEY_PATTERNS:
        match = pattern.search(text)
        if match:
            key = match.group(1)
            if "." not in key:  # "Key 'rooot' is not in struct" names the leaf only
                key = next((a.split("=", 1)[0].lstrip("+~") for a in job if a.split("=", 1)[0].endswith("." + key)), key)
            return key
    return None


def check_overrides(argv: Sequence[str], config_name: str = "train", tool: str = "vpt-train") -> list[str]:
    """Compose the config with the command line's overrides; refuse a mistake in one sentence.

    ``trainer.X=V`` may name any ``lightning.Trainer`` argument and ``method.X=V`` any
    method's option, listed in the config or not: one the composed config lacks is rewritten
    ``++trainer.X=V`` (add or override), which Hydra accepts.

    Only plain ``key=value`` command lines (and ``-m`` sweeps of ``a,b`` values: their first
    job is composed) are checked; anything with other Hydra flags (``--help``, ``--cfg``,
    ``-cp``) is returned unchanged for Hydra.

    Returns:
        ``argv`` with the ``++`` rewrites.

    Raises:
        ConfigError: an unknown key (with the closest valid one), an unknown config name in
            a group (with the closest and the list), or an override Hydra cannot parse.
    """
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    argv = list(argv)
    positions = [index for index, arg in enumerate(argv) if arg not in _MULTIRUN_FLAGS]
    if any(argv[i].startswith("-") or "=" not in argv[i] for i in positions):
        return argv
    for _ in range(len(positions) + 1):
        overrides = [argv[i] for i in positions]
        try:
            job = _first_of_sweeps(overrides)
        except OverrideParseException as error:
            raise ConfigError(f"Cannot read the command line ({str(error).splitlines()[0]}); write each setting as key=value.") from None
        if job is None:
            return argv
        try:
            _compose(job, config_name)
            return argv
        except MissingConfigException as error:
            sentence = _missing_option_sentence(error)
            if sentence is None:
                raise ConfigError(f"{str(error).splitlines()[0]}; check the config names on the command line.") from None
            raise ConfigError(sentence) from None
        except (ConfigCompositionException, OverrideParseException) as error:
            key = _failing_key(error, job)
            if key is None:
                raise ConfigError(f"{str(error).splitlines()[0]}; check the command line's key=value settings.") from None
            head, _, leaf = key.partition(".")
            index = next((i for i in positions if argv[i].split("=", 1)[0].lstrip("+") == key), None)
            if index is not None and not argv[index].startswith("++") and leaf in _known_names(head):
                argv[index] = "++" + argv[index].lstrip("+")
                continue
            raise ConfigError(_unknown_key_sentence(key, job, config_name, tool) + ".") from None
    return argv
