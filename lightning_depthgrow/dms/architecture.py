"""A searched architecture as a plain record, and the model it describes rebuilt from a fresh supernet.

DMS's first pipeline (the paper's "search, then train from scratch") needs the architecture a search
found apart from the weights it trained: :func:`export_architecture` writes it as a JSON-ready dict
(which elements of every gate stay), :func:`build_architecture` slices any model built like the
supernet to it. Pass a freshly constructed supernet to get the found architecture with fresh weights
(train it from scratch); pass the searched one to get what export gives.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..adapters.registry import UnsupportedModelError
from ..events import AppliedChange, ArchitectureEvent
from .export import export_model
from .families import discover_gates
from .gates import attach_gates, find_gates, remove_gates
from .sites import is_embed_site

FORMAT = "lightning_depthgrow.dms.architecture/1"


def export_architecture(model: nn.Module, events: Iterable[ArchitectureEvent | dict] | None = None) -> dict[str, Any]:
    """The architecture the DMS gates keep, as a JSON-ready dict that :func:`build_architecture` rebuilds.

    Reads the gates attached to ``model`` (their current hard masks; fit them to the budget first with
    :func:`~lightning_depthgrow.dms.fit_to_budget` if you want the export's choice), or, for a model
    DMS has already exported, the ``dms_attach`` and ``dms_export`` events of ``events`` (the module's
    event log, ``lightning_depthgrow.callbacks.event_log(lit_module)``). Returns::

        {"format": ..., "flags": {"width": ..., "heads": ..., "depth": ...},
         "gates": {name: {"kind": "width" | "heads" | "depth", "n": supernet size, "keep": [kept indices]}},
         "summary": {name: kept count}}

    Example:
        >>> import timm
        >>> from lightning_depthgrow.dms import attach_gates
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> _ = attach_gates(vit)
        >>> arch = export_architecture(vit)
        >>> arch["summary"]
        {'blocks/0:heads': 3, 'blocks/0:mlp': 768, 'blocks/1:heads': 3, 'blocks/1:mlp': 768, 'blocks:depth': 2}
    """
    gates = find_gates(model)
    if gates is not None:
        specs, keep = gates.specs, gates.keep()
        flags = _flags_of(specs)
    else:
        attach, export = _events(events)
        if attach is None or export is None:
            raise ValueError(
                "export_architecture needs a model with DMS gates attached, or the event log of a DMS run "
                "that has exported (events=lightning_depthgrow.callbacks.event_log(lit_module))."
            )
        specs, keep = attach.spec["gates"], export.spec["keep"]
        flags = {k: bool(attach.spec[k]) for k in ("width", "heads", "depth")}
        if attach.spec.get("embed"):
            flags["embed"] = True
    return {
        "format": FORMAT,
        "flags": flags,
        "gates": {
            s["name"]: {"kind": s["kind"], "n": s["n"], "keep": [int(i) for i in keep[s["name"]]]} for s in specs
        },
        "summary": {s["name"]: len(keep[s["name"]]) for s in specs},
    }


def build_architecture(model: nn.Module, architecture: dict[str, Any]) -> AppliedChange:
    """Slice ``model`` (built like the searched supernet) in place to ``architecture``; returns the change.

    Gate names are matched as recorded or, when the record was taken on a wrapper (a LightningModule
    holding the network as ``model``), by their path inside it, so an architecture searched on
    ``lit_module`` rebuilds a bare network and the other way round. Everything is checked before the
    model is touched; a mismatch (another supernet) raises
    :class:`~lightning_depthgrow.UnsupportedModelError` naming the gates that differ.

    Example:
        >>> import timm
        >>> from lightning_depthgrow.dms import attach_gates
        >>> make = lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> searched = make()
        >>> gates = attach_gates(searched)
        >>> arch = export_architecture(searched)
        >>> arch["gates"]["blocks:depth"]["keep"] = [1]
        >>> arch["gates"]["blocks/1:mlp"]["keep"] = list(range(100))
        >>> fresh = make()
        >>> _ = build_architecture(fresh, arch)
        >>> len(fresh.blocks), fresh.blocks[0].mlp.fc1.out_features
        (1, 100)
    """
    if architecture.get("format") != FORMAT:
        raise ValueError(f"not a DMS architecture record (format {architecture.get('format')!r}, expected {FORMAT!r})")
    if find_gates(model) is not None:
        raise RuntimeError("the model already has DMS gates attached; build_architecture needs a plain model.")
    flags = architecture["flags"]
    embed = bool(flags.get("embed", False))
    found = discover_gates(model, flags["width"], flags["heads"], flags["depth"], embed=embed)
    recorded = architecture["gates"]
    keep: dict[str, list[int]] = {}
    problems = []
    for spec in found:
        names = [r for r in recorded if _same_gate(r, spec["name"])]
        if not names:
            names = [r for r in recorded if _same_gate(spec["name"], r)]
        if len(names) != 1:
            problems.append(f"{spec['name']}: {'no' if not names else 'ambiguous'} record")
            continue
        entry = recorded[names[0]]
        if entry["n"] != spec["n"] or entry["kind"] != spec["kind"]:
            problems.append(f"{spec['name']}: recorded {entry['kind']} of {entry['n']}, model has {spec['n']}")
            continue
        keep[spec["name"]] = list(entry["keep"])
    if problems or len(keep) != len(recorded):
        raise UnsupportedModelError(
            "the architecture does not fit this model (build the same supernet the search started from): "
            + "; ".join(problems or [f"recorded {len(recorded)} gates, the model has {len(found)}"])
        )
    attach_gates(model, flags["width"], flags["heads"], flags["depth"], embed=embed)
    try:
        return export_model(model, keep)
    except Exception:
        remove_gates(model)
        raise


def _same_gate(longer: str, name: str) -> bool:
    """Whether gate ``longer`` (``"model/blocks/0:mlp"``, ``"model:embed"``) is gate ``name`` (``"blocks/0:mlp"``,
    ``":embed"``) seen from a module that holds the network under a path: same suffix, ``name``'s path a tail of
    ``longer``'s."""
    if longer == name:
        return True
    long_path, _, long_kind = longer.rpartition(":")
    path, _, kind = name.rpartition(":")
    long_parts, parts = [p for p in long_path.split("/") if p], [p for p in path.split("/") if p]
    return long_kind == kind and len(long_parts) > len(parts) and long_parts[len(long_parts) - len(parts) :] == parts


def _flags_of(specs: list[dict[str, Any]]) -> dict[str, bool]:
    kinds = {s["kind"] for s in specs}
    flags = {"width": "width" in kinds, "heads": "heads" in kinds, "depth": "depth" in kinds}
    if any(is_embed_site(s["site"]) for s in specs):
        flags["embed"] = True
        # the embedding gate is a width gate: "width" means the block-level width gates (MLP hidden units)
        flags["width"] = any(s["kind"] == "width" and not is_embed_site(s["site"]) for s in specs)
    return flags


def _events(events: Iterable[ArchitectureEvent | dict] | None) -> tuple[ArchitectureEvent | None, ...]:
    attach = export = None
    for e in events or []:
        event = e if isinstance(e, ArchitectureEvent) else ArchitectureEvent.from_dict(e)
        if event.kind == "dms_attach":
            attach = event
        elif event.kind == "dms_export":
            export = event
    return attach, export
