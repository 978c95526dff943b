"""Thin Lightning shells: when to measure, grow, scale and log; on which ranks; how to stay in sync.

For a callback of your own that changes the architecture, the same plumbing the built-in ones use:
:func:`apply_and_sync` (apply an event, bring optimizers, schedulers and DDP in line, record it),
:func:`restore_architecture` (call from ``setup``: replays a checkpoint's log before weights load),
:func:`save_event_log` (call from ``on_save_checkpoint``) and :func:`event_log` (the module's log).
"""

from ._common import apply_and_sync, event_log, restore_architecture, save_event_log
from .architecture_logger import ArchitectureLogger
from .curvature_monitor import CurvatureMonitor
from .depth_growth import DepthGrowth
from .dms import DifferentiableModelScaling
from .neuron_growth import NeuronGrowth

__all__ = [
    "ArchitectureLogger",
    "CurvatureMonitor",
    "DepthGrowth",
    "DifferentiableModelScaling",
    "NeuronGrowth",
    "apply_and_sync",
    "event_log",
    "restore_architecture",
    "save_event_log",
]
