"""Curvature of the training loss, per block: Hessian-vector products, Hutchinson traces, top eigenvalues,
splitting-matrix eigenvalues. Pure torch (no Lightning): usable from any training loop."""

from .blocks import discover_blocks, resolve_blocks
from .estimate import (
    CurvatureEstimate,
    CurvatureEstimationError,
    CurvatureOutOfMemoryError,
    InvalidBatchesError,
    estimate_curvature,
)
from .estimators import TraceEstimate, hutchinson_trace, rademacher, top_eigenvalue
from .fisher import empirical_fisher_trace
from .hvp import DenseOperator, HessianOperator, LinearOperator, LossFunctionError
from .splitting import splitting_eigenvalues
from .state import estimation_mode, preserve_model_state

__all__ = [
    "CurvatureEstimate",
    "CurvatureEstimationError",
    "CurvatureOutOfMemoryError",
    "DenseOperator",
    "HessianOperator",
    "InvalidBatchesError",
    "LinearOperator",
    "LossFunctionError",
    "TraceEstimate",
    "discover_blocks",
    "empirical_fisher_trace",
    "estimate_curvature",
    "estimation_mode",
    "hutchinson_trace",
    "preserve_model_state",
    "rademacher",
    "resolve_blocks",
    "splitting_eigenvalues",
    "top_eigenvalue",
]
