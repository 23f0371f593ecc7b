"""Training methods, each one registered object created by name (``method.name`` in the config).

A method owns its model, its losses and its per-step behaviour (see :class:`unimed.methods.base.
Method`); the training loop runs any of them. Every built-in method is registered here, in one
place, from its light config class and the "module:function" of its builder, so the registry has no
import cycle and reading a config loads no model code.
"""

from unimed.methods.registry import (
    METHODS,
    MethodConfig,
    MethodSpec,
    create_method,
    method_label,
    register_method,
)
from unimed.models.config import MedUniCConfig
from unimed.models.prior_config import PriorConfig
from unimed.models.unimedi_config import UniMedIConfig

register_method("medunic", MedUniCConfig, "unimed.methods.medunic:build_medunic", "Med-UniC")
register_method("prior", PriorConfig, "unimed.methods.prior:build_prior", "PRIOR")
register_method("unimedi", UniMedIConfig, "unimed.methods.unimedi:build_unimedi", "UniMedI")

__all__ = ["METHODS", "MethodConfig", "MethodSpec", "create_method", "method_label", "register_method"]
