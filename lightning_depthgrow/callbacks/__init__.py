"""Thin Lightning shells: when to measure, grow, scale and log; on which ranks; how to stay in sync.

For a callback of your own that changes the architecture, derive from
:class:`~lightning_depthgrow.callbacks.base.ArchitectureCallback` and implement ``propose`` (what to change);
the base owns preflight checks, resume, rank sync, optimizer/scheduler/DDP sync, checkpoints and teardown
(docs/custom_callback.md). Callbacks that cannot derive from it use the same plumbing:
:func:`apply_and_sync` (apply an event, bring optimizers, schedulers and DDP in line, record it),
:func:`restore_architecture` (call from ``setup``: replays a checkpoint's log before weights load),
:func:`release_module` (call from ``teardown``), :func:`save_event_log` (call from ``on_save_checkpoint``) and
:func:`event_log` (the module's log).
"""

from ..events import event_log, save_event_log
from .architecture_logger import ArchitectureLogger
from .base import ArchitectureCallback
from .curvature_monitor import CurvatureMonitor
from .depth_growth import DepthGrowth
from .dms import DifferentiableModelScaling
from .neuron_growth import NeuronGrowth
from .plumbing import apply_and_sync, release_module, restore_architecture

__all__ = [
    "ArchitectureCallback",
    "ArchitectureLogger",
    "CurvatureMonitor",
    "DepthGrowth",
    "DifferentiableModelScaling",
    "NeuronGrowth",
    "apply_and_sync",
    "event_log",
    "release_module",
    "restore_architecture",
    "save_event_log",
]
