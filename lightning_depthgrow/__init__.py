"""lightning-depthgrow: grow or prune a model's architecture while it trains, guided by curvature.

Callbacks live in :mod:`lightning_depthgrow.callbacks`; the framework-free cores in
:mod:`~lightning_depthgrow.curvature`, :mod:`~lightning_depthgrow.surgery`, :mod:`~lightning_depthgrow.dms`
and :mod:`~lightning_depthgrow.adapters`.
"""

from .adapters import BlockAdapter, UnsupportedModelError, find_block_stacks, register_block
from .events import ArchitectureEvent, EventLogMismatchError, apply_event, replay_events
from .loading import load_grown

__version__ = "0.1.0"

__all__ = [
    "ArchitectureEvent",
    "BlockAdapter",
    "EventLogMismatchError",
    "UnsupportedModelError",
    "apply_event",
    "find_block_stacks",
    "load_grown",
    "register_block",
    "replay_events",
]
