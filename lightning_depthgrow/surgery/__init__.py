"""Pure surgery on ``nn.Module`` and ``torch.optim.Optimizer``: grow depth, bring optimizers in line.

Importing this package registers its event kinds (``"insert_block"``, ``"neuron_branch"``) with
:mod:`lightning_depthgrow.events`.
"""

from .growth import insert_identity_block
from .neuron_branch import BranchedLinear, add_neuron_branch, neuron_branches
from .optim import order_like_model, sync_schedulers, update_optimizer

__all__ = [
    "BranchedLinear",
    "add_neuron_branch",
    "insert_identity_block",
    "neuron_branches",
    "order_like_model",
    "sync_schedulers",
    "update_optimizer",
]
