"""Pure surgery on ``nn.Module`` and ``torch.optim.Optimizer``: grow depth, bring optimizers in line.

Importing this package registers its event kinds (``"insert_block"``, ``"neuron_branch"``) with
:mod:`lightning_depthgrow.events`.

Depth (:mod:`lightning_depthgrow.surgery.growth`):

* :func:`insert_identity_block` inserts an identity-initialised copy of a block; with an example input it is
  verified on a real forward pass and undone if the outputs move.
* :func:`verify_insertions` verifies every insertion made inside a ``with`` block (also through ``apply_event``).
* :func:`check_growable` says, before training, which block stacks can grow (one verified trial per stack).
* :func:`remove_block` removes a block with the same bookkeeping (the inverse of an insertion).
* :class:`FunctionNotPreservedError` is raised when a verified insertion changed the function; nothing is changed.

Example:
    >>> import timm, torch
    >>> from lightning_depthgrow.surgery import check_growable, insert_identity_block, remove_block
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> check_growable(vit, x)
    {'blocks': None}
    >>> _ = insert_identity_block(vit, "blocks", after_index=1, seed=0, check_input=x)
    >>> _ = remove_block(vit, "blocks", 2)
    >>> len(vit.blocks)
    2
"""

from .growth import (
    FunctionNotPreservedError,
    check_growable,
    insert_identity_block,
    remove_block,
    verify_insertions,
)
from .neuron_branch import BranchedLinear, add_neuron_branch, neuron_branches
from .operators import copy_block, insert_random_block, stack_blocks
from .optim import order_like_model, sync_schedulers, update_optimizer
from .ramp import advance_ramps, attach_ramp, fold_ramps

__all__ = [
    "BranchedLinear",
    "FunctionNotPreservedError",
    "add_neuron_branch",
    "advance_ramps",
    "attach_ramp",
    "check_growable",
    "copy_block",
    "fold_ramps",
    "insert_identity_block",
    "insert_random_block",
    "neuron_branches",
    "order_like_model",
    "remove_block",
    "stack_blocks",
    "sync_schedulers",
    "update_optimizer",
    "verify_insertions",
]
