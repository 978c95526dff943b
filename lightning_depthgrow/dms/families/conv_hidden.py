"""The inner-channel gate of a residual convolution block, shared by the ResNet families (timm, torchvision).

A gate spec ``{"block", "producer", "norm", "consumer"}`` names the convolution whose output channels are gated,
the per-channel norm after it and the convolution that reads them: the mask multiplies ``consumer``'s input
channels, and export slices the producer's outputs, the norm and the consumer's inputs together.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..hooks import InputMask
from ..sites import DMSFamily, GateSpec, Hook, gate_name, slice_conv_hidden
from ..topk import WIDTH


class ConvHiddenFamily(DMSFamily):
    """A family whose width gates are inner conv channels; its one site is ``sites[0]``.

    Subclasses decide which ``(producer, norm, consumer)`` triples of a block can be gated (and refuse the others)
    and build the specs with :meth:`conv_hidden_spec`; masking, export and the resource roles are shared.
    """

    def conv_hidden_spec(self, path: str, block: nn.Module, producer: str, norm: str, consumer: str) -> GateSpec:
        """The gate spec of the channels ``producer`` -> ``norm`` -> ``consumer`` of ``block`` at ``path``."""
        return {
            "name": gate_name(path, producer),
            "kind": WIDTH,
            "site": self.sites[0],
            "block": path,
            "producer": producer,
            "norm": norm,
            "consumer": consumer,
            "n": block.get_submodule(producer).out_channels,
            "min_keep": 1,
        }

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Any) -> list[Hook]:
        return [(model.get_submodule(f"{spec['block']}.{spec['consumer']}"), "pre", InputMask(gates, index, 1))]

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        get = model.get_submodule(spec["block"]).get_submodule
        slice_conv_hidden(slices, get(spec["producer"]), get(spec["norm"]), get(spec["consumer"]), keep)

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        b = spec["block"]
        return [("out", f"{b}.{spec['producer']}"), ("norm", f"{b}.{spec['norm']}"), ("in", f"{b}.{spec['consumer']}")]
