"""The command-line tools answer ``--help`` and argument errors without importing torch,
Lightning or the backbones, so they answer at once; ``vpt``'s own names still load on use.

Each check runs in a fresh Python process (this one has torch loaded already). Times are
measured by ``scripts/benchmark_cli.py``, not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import vpt

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "timm", "monai", "segment_anything", "cv2", "albumentations", "matplotlib")
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
MODULES = sorted(target.split(":", 1)[0] for target in SCRIPTS.values())
# One mistake per tool that is refused from the arguments alone.
ARGUMENT_ERRORS = {
    "vpt.cli.train": ["--no-such-flag"],
    "vpt.cli.evaluate": ["split=bogus"],
    "vpt.cli.compare": ["--no-such-flag"],
    "vpt.cli.predict": ["output=out"],
    "vpt.cli.check_data": [],
    "vpt.cli.export": ["output=out"],
}


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _heavy_after(statement: str, tmp_path: Path) -> list[str]:
    result = _python(f"import json, sys\n{statement}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_console_script_is_covered() -> None:
    assert set(MODULES) == set(ARGUMENT_ERRORS)


@pytest.mark.parametrize("module", ["vpt", *MODULES])
def test_import_leaves_the_heavy_stack_out(module: str, tmp_path: Path) -> None:
    assert _heavy_after(f"import {module}", tmp_path) == []


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("case", ["help", "argument error"])
def test_help_and_argument_errors_leave_the_heavy_stack_out(module: str, case: str, tmp_path: Path) -> None:
    """The whole answer, not only the import: ``main`` runs and exits before torch is needed."""
    args = ["--help"] if case == "help" else ARGUMENT_ERRORS[module]
    code = (
        "import sys\n"
        f"sys.argv = ['tool', *{args!r}]\n"
        f"from {module} import main\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    code = stop.code\nelse:\n    code = 0\n"
        f"print('EXIT', code, [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = _python(code, tmp_path)
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"EXIT {0 if case == 'help' else 2} []", (last, result.stderr[-2000:])
    if case == "argument error":
        assert result.stderr.strip(), "an argument error says what is wrong"
    assert list(tmp_path.iterdir()) == [], "nothing is written"


@pytest.mark.parametrize(
    "args, words",
    [
        (["trainer.max_epochs=1", "method=vpt_dep"], ["method=vpt_dep", "did you mean method=vpt_deep?"]),
        (["task=volume_seg", "task.data.rooot=/x"], ["task.data.rooot", "did you mean task.data.root?"]),
        (["-m", "method=vpt_deep,lora", "task=volum_seg"], ["did you mean task=volume_seg?"]),
    ],
)
def test_config_mistakes_are_one_sentence_before_torch_loads(args: list[str], words: list[str], tmp_path: Path) -> None:
    code = (
        "import sys\n"
        f"sys.argv = ['vpt-train', *{args!r}]\n"
        "from vpt.cli.train import main\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    code = stop.code\nelse:\n    code = 0\n"
        f"print('EXIT', code, [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = _python(code, tmp_path)
    assert result.stdout.strip().splitlines()[-1] == "EXIT 2 []", result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("vpt: error:")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), result.stderr[-2000:]
    assert "+task" not in result.stderr and "+method" not in result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def _console_script(tool: str) -> list[str]:
    installed = Path(sys.executable).parent / tool
    return [str(installed)] if installed.is_file() else [sys.executable, "-m", SCRIPTS[tool].split(":", 1)[0]]


def test_predict_help_shows_the_arguments(tmp_path: Path) -> None:
    result = subprocess.run(_console_script("vpt-predict") + ["--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vpt-predict run_dir=" in result.stdout and "input=PATH" in result.stdout


def test_train_help_shows_our_text_and_the_config_groups(tmp_path: Path) -> None:
    result = subprocess.run(_console_script("vpt-train") + ["--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "visual prompt tuning of frozen vision encoders" in result.stdout
    assert "== Configuration groups ==" in result.stdout
    groups = {line.split(":", 1)[0] for line in result.stdout.splitlines() if ": " in line and not line.startswith(" ")}
    assert {"method", "model", "task", "trainer"} <= groups, groups
    assert "vpt_deep" in result.stdout and "organ_seg" in result.stdout
    assert list(tmp_path.iterdir()) == [], "--help writes no run folder"


def test_package_names_load_on_first_use() -> None:
    from vpt.methods import apply_method
    from vpt.metrics import volume_scores
    from vpt.prompts import PromptedSamEncoder, PromptedViT

    assert vpt.PromptedViT is PromptedViT and vpt.PromptedSamEncoder is PromptedSamEncoder
    from vpt import apply_method as exported

    assert exported is apply_method and vpt.volume_scores is volume_scores
    assert set(vpt.__all__) <= set(dir(vpt))
    with pytest.raises(AttributeError, match="no_such_name"):
        vpt.no_such_name  # noqa: B018


def test_benchmark_script_writes_its_table(tmp_path: Path) -> None:
    """A smoke test of ``scripts/benchmark_cli.py`` on one tool; times are not judged."""
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- benchmark:cpu-vit_b -->\nkept\n<!-- /benchmark:cpu-vit_b -->\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_cli.py"), "--tools", "vpt-predict", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "kept" in text and "## Command-line start-up" in text
    assert "| `vpt-predict --help` | help | 0 |" in text
    assert "| `vpt-predict output=out` | argument error | 2 |" in text
