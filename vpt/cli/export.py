"""Write a finished run as a shareable model folder (model.safetensors, config.json, README.md).

    vpt-export run_dir=outputs/2026-12-03/10-00-00 output=models/organ_vpt
    vpt-export run_dir=outputs/... output=models/organ_vpt push_to_hub=<user>/<repo>

Arguments are ``key=value`` pairs:

  run_dir=RUN          a finished run folder
  output=DIR           the model folder to create (must not exist, or be empty)
  push_to_hub=REPO     also upload the folder to this Hugging Face Hub repository
                       (needs huggingface_hub installed and a login)

Predict with the folder: vpt-predict model=DIR input=... output=...; in Python:
vpt.load_pretrained(DIR). The training data is not needed.
"""

from __future__ import annotations

from typing import Optional, Sequence

from vpt.cli.arguments import key_value_arguments
from vpt.cli.errors import exit_on_user_error
from vpt.errors import ConfigError

__all__ = ["main"]


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``vpt-export run_dir=... output=...``)."""
    own: dict[str, Optional[str]] = {"run_dir": None, "output": None, "push_to_hub": None}
    for key, value in key_value_arguments(argv, "vpt-export", __doc__):
        if key not in own:
            raise ConfigError(f"vpt-export takes run_dir=, output= and push_to_hub=, not {key}=; see vpt-export --help.")
        own[key] = value
    if not own["run_dir"] or not own["output"]:
        raise ConfigError("Pass run_dir=<a finished run folder> and output=<a new folder for the model>.")
    from vpt.inference.export import export_model

    folder = export_model(own["run_dir"], own["output"], push_to_hub=own["push_to_hub"])
    print(f"Wrote {folder} (model.safetensors, config.json, README.md); predict with: vpt-predict model={folder} input=... output=...")


if __name__ == "__main__":
    main()
