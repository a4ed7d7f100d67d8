"""BitFit (Ben Zaken et al., ACL 2022): only the encoder's bias terms train."""

from __future__ import annotations

from torch import nn

from vpt.errors import ConfigError
from vpt.methods.encoders import inner_encoder, wrap_encoder
from vpt.methods.registry import MethodConfig, register_method

__all__: list[str] = []


@register_method("bitfit", MethodConfig)
def bitfit(encoder: nn.Module, config: MethodConfig) -> nn.Module:
    """Every ``bias`` of the encoder (attention, MLP, norms, patch embedding) trains; the
    rest stays frozen and the encoder stays in eval mode."""
    model = wrap_encoder(encoder, 0)
    biases = [param for name, param in inner_encoder(model).named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    if not biases:
        raise ConfigError("method=bitfit found no bias terms in this encoder; pick another method.")
    for param in biases:
        param.requires_grad_(True)
    return model
