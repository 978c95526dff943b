"""Differentiable Model Scaling (Liu et al., ICML 2024): differentiable top-k gates, soft resource
counts and export by slicing. No Lightning here; see
:class:`lightning_depthgrow.callbacks.dms.DifferentiableModelScaling` for the training-loop shell.
"""

from .appliers import ARCH_GROUP_KEY, apply_attach, apply_export, arch_group_options, attach_event, export_event
from .architecture import build_architecture, export_architecture
from .export import export_model
from .families import discover_gates
from .gates import (
    CONTAINER,
    TIE_KINDS,
    DMSGates,
    attach_gates,
    check_tie,
    find_gates,
    remove_gates,
    set_importance,
    tie_specs,
)
from .resource import BudgetFit, ResourceModel, fit_architecture, fit_to_budget
from .sites import (
    DMSFamily,
    dms_families,
    gate_name,
    register_dms_family,
    slice_linear_hidden,
    unregister_dms_family,
)
from .topk import GateBank, TopKGate, default_temperature, normalised_rank, update_importance

__all__ = [
    "ARCH_GROUP_KEY",
    "CONTAINER",
    "TIE_KINDS",
    "BudgetFit",
    "DMSFamily",
    "DMSGates",
    "GateBank",
    "ResourceModel",
    "TopKGate",
    "apply_attach",
    "apply_export",
    "arch_group_options",
    "attach_event",
    "attach_gates",
    "build_architecture",
    "check_tie",
    "default_temperature",
    "discover_gates",
    "dms_families",
    "export_architecture",
    "export_event",
    "export_model",
    "find_gates",
    "fit_architecture",
    "fit_to_budget",
    "gate_name",
    "normalised_rank",
    "register_dms_family",
    "remove_gates",
    "set_importance",
    "slice_linear_hidden",
    "tie_specs",
    "unregister_dms_family",
    "update_importance",
]
