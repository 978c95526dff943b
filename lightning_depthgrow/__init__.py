"""lightning-depthgrow: grow or prune a model's architecture while it trains, guided by curvature.

Callbacks live in :mod:`lightning_depthgrow.callbacks` (built on
:class:`~lightning_depthgrow.callbacks.base.ArchitectureCallback`); the framework-free cores in
:mod:`~lightning_depthgrow.growth` (budgets, schedules, planners), :mod:`~lightning_depthgrow.curvature`,
:mod:`~lightning_depthgrow.surgery`, :mod:`~lightning_depthgrow.dms` and :mod:`~lightning_depthgrow.adapters`.
Importing this package, and :func:`load_grown`, needs no Lightning.
"""

from .adapters import BlockAdapter, UnsupportedModelError, find_block_stacks, register_block
from .events import CHECKPOINT_KEY, ArchitectureEvent, EventLogMismatchError, apply_event, event_log, replay_events
from .loading import load_grown

__version__ = "0.11.0"

__all__ = [
    "CHECKPOINT_KEY",
    "ArchitectureEvent",
    "BlockAdapter",
    "EventLogMismatchError",
    "UnsupportedModelError",
    "apply_event",
    "event_log",
    "find_block_stacks",
    "load_grown",
    "register_block",
    "replay_events",
]
