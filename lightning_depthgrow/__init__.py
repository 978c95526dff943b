"""lightning-depthgrow: grow or prune a model's architecture while it trains, guided by curvature."""

from .adapters import BlockAdapter, UnsupportedModelError, find_block_stacks, register_block
from .events import ArchitectureEvent, EventLogMismatchError, apply_event, replay_events

__version__ = "0.1.0"

__all__ = [
    "ArchitectureEvent",
    "BlockAdapter",
    "EventLogMismatchError",
    "UnsupportedModelError",
    "apply_event",
    "find_block_stacks",
    "register_block",
    "replay_events",
]
