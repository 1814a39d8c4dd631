"""Pair the language-model tensors of a VLM with those of a text LLM, by on-disk names.

    with open_checkpoint("Qwen/Qwen2.5-VL-7B-Instruct") as vlm, open_checkpoint("deepseek-ai/…") as llm:
        al = align(vlm, llm)                    # AlignmentError if shapes disagree
        pairs = al.select(Selection())          # SelectionError if a family matches nothing
        al.counts(pairs)                        # {"matched": …, "unmatched_lm": …, "vision": …, "skipped": …}

The correspondence is discovered, not looked up: ``detect_layout`` finds each side's
language-model prefix (``model.language_model.``, ``model.``, ``language_model.model.``,
``model.text_model.`` …) and head, both sides' names are reduced to LM-relative names
(``layers.3.mlp.up_proj.weight``, ``lm_head.weight``), and equal relative names are paired when
their shapes agree. Vision tower and projector tensors are never paired.

Shapes: embeddings and head may differ in their first dimension (a VLM adds tokens); then the
shared leading rows are paired (``Pair.rows``) and a note says so. Any other difference is an
AlignmentError listing examples: the models do not share an architecture.

Tied embeddings (no stored ``lm_head.weight``): a side's head is then its ``embed_tokens``.
- VLM stores a head, LLM ties: the VLM head pairs with the LLM's embeddings.
- VLM ties, LLM stores a head: the VLM has no head tensor of its own, so the LLM head stays
  unpaired (counted in ``llm_only``); the VLM embeddings pair with the LLM embeddings.
- Both tie: embeddings pair with embeddings; there is no head to pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from typing import Any

from surgeon.io.checkpoint import Checkpoint
from surgeon.errors import AlignmentError
from surgeon.anatomy.experts import expert_view
from surgeon.anatomy.families import Selection, family, select
from surgeon.anatomy.layout import Layout, detect_layout

EMBED = "embed_tokens.weight"
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Pair:
    """One VLM tensor and its LLM counterpart.

    ``shape`` is the VLM tensor's shape. ``rows`` is None when the shapes are equal, else the
    number of leading rows the two share (embeddings / head of different vocabularies).
    """

    relative: str
    vlm_name: str
    llm_name: str
    shape: tuple[int, ...]
    rows: int | None = None

    @property
    def family(self) -> str:
        return family(self.relative)


@dataclass(frozen=True)
class Alignment:
    """The pairing of a VLM's language model with an LLM, and what stayed unpaired.

    ``pairs`` follow the VLM's on-disk order. ``unmatched_lm``: VLM language-model tensors with no
    counterpart (VLM names); ``llm_only``: LLM tensors with no VLM counterpart (LLM names);
    ``vision``: VLM vision tower and projector tensors; ``other``: VLM tensors outside all three.
    """

    vlm_layout: Layout
    llm_layout: Layout
    pairs: tuple[Pair, ...]
    unmatched_lm: tuple[str, ...]
    llm_only: tuple[str, ...]
    vision: tuple[str, ...]
    other: tuple[str, ...]
    notes: tuple[str, ...]
    llm: Any = None  # where to read the LLM's side of the pairs (a ``surgeon.anatomy.experts.View`` when some are assembled)
    vlm: Any = None  # where to read the VLM's side (a ``surgeon.io.quantized.Dequantized`` view when it is quantized)

    def select(self, selection: Selection) -> list[Pair]:
        """The pairs ``selection`` accepts; SelectionError / ConfigError as ``families.select``.

        AlignmentError when a selected family keeps tensors unpaired on both sides (the layouts
        differ in a way surgeon cannot bridge: pairing only the rest would leave most of that
        family out, silently)."""
        by_rel = {p.relative: p for p in self.pairs}
        chosen = select(list(by_rel), selection, self.vlm_layout.num_layers)
        vlm_left = [self.vlm_layout.lm_relative(n) or n for n in self.unmatched_lm]
        llm_left = [self.llm_layout.lm_relative(n) or n for n in self.llm_only]
        for fam in sorted({family(r) for r in vlm_left} & {family(r) for r in llm_left}):
            ours = [r for r in vlm_left if family(r) == fam and selection.accepts(r)]
            theirs = [r for r in llm_left if family(r) == fam and selection.accepts(r)]
            if ours and theirs:
                raise AlignmentError(
                    f"{len(ours)} selected {fam} tensor(s) of the VLM and {len(theirs)} of the reasoning model have no counterpart",
                    [f"VLM {ours[0]}", f"LLM {theirs[0]}"],
                    "the two checkpoints store this part in layouts surgeon cannot pair; narrow --modules to leave it out",
                )
        return [by_rel[r] for r in chosen]

    def counts(self, selected: Sequence[Pair] | None = None) -> dict[str, int]:
        """``matched`` pairs, ``unmatched_lm``, ``llm_only``, ``vision`` (incl. projector),
        ``other``, and ``skipped`` (matched but not selected) when ``selected`` is given."""
        out = {
            "matched": len(self.pairs),
            "unmatched_lm": len(self.unmatched_lm),
            "llm_only": len(self.llm_only),
            "vision": len(self.vision),
            "other": len(self.other),
        }
        if selected is not None:
            out["selected"] = len(selected)
            out["skipped"] = len(self.pairs) - len(selected)
        return out


def _relative_names(ckpt: Checkpoint, layout: Layout) -> dict[str, str]:
    out = {}
    for name in ckpt.tensors:
        rel = layout.lm_relative(name)
        if rel is not None:
            out[rel] = name
    return out


def align(vlm: Checkpoint, llm: Checkpoint) -> Alignment:
    """Pair ``vlm``'s language-model tensors with ``llm``'s (see the module docstring)."""
    from surgeon.io.quantized import dequantized

    vlm, llm = dequantized(vlm), dequantized(llm)  # quantized weights are read as their values
    vlay = detect_layout(list(vlm.tensors), vlm.config, vlm.source)
    llay = detect_layout(list(llm.tensors), llm.config, llm.source)
    vrel, lrel = _relative_names(vlm, vlay), _relative_names(llm, llay)
    notes: list[str] = []
    llm_only_extra: list[str] = []
    if HEAD in vrel and HEAD not in lrel and EMBED in lrel:
        lrel = dict(lrel, **{HEAD: lrel[EMBED]})
        notes.append(f"{llm.source} ties its head to its embeddings: the VLM's {vrel[HEAD]} pairs with {lrel[EMBED]}")
    elif HEAD not in vrel and HEAD in lrel:
        llm_only_extra.append(lrel.pop(HEAD))
        notes.append(f"{vlm.source} ties its head to its embeddings, so {llm.source}'s separate lm_head.weight is not used")

    view, added, consumed, expert_notes = expert_view(vrel, lrel, vlm, llm)
    lrel.update(added)
    notes += expert_notes
    pairs: list[Pair] = []
    mismatched: list[str] = []
    for rel, vname in vrel.items():
        lname = lrel.get(rel)
        if lname is None:
            continue
        vs, ls = vlm.tensors[vname].shape, view.tensors[lname].shape
        if vs == ls:
            pairs.append(Pair(rel, vname, lname, vs))
        elif family(rel) in ("embed", "head") and len(vs) == len(ls) >= 1 and vs[1:] == ls[1:]:
            rows = min(vs[0], ls[0])
            pairs.append(Pair(rel, vname, lname, vs, rows))
            notes.append(f"{rel}: {vs[0]} rows in the VLM, {ls[0]} in {llm.source}; the first {rows} rows are paired")
        else:
            mismatched.append(f"{rel}: VLM {list(vs)} vs {list(ls)}")
    if mismatched:
        raise AlignmentError(
            f"{len(mismatched)} language-model tensor(s) of {vlm.source} and {llm.source} differ in shape",
            mismatched,
            "the reasoning model must share the VLM's language-model architecture (e.g. Qwen2.5-VL-7B with a Qwen2.5-7B derivative)",
        )
    if not pairs:
        raise AlignmentError(
            f"{vlm.source} and {llm.source} have no language-model tensor names in common",
            [f"VLM {next(iter(vrel), '-')}", f"LLM {next(iter(lrel), '-')}"],
            "the reasoning model must share the VLM's language-model architecture",
        )
    if vlay.num_layers != llay.num_layers:
        raise AlignmentError(
            f"{vlm.source} has {vlay.num_layers} decoder layers and {llm.source} {llay.num_layers}",
            (),
            "the reasoning model must share the VLM's language-model architecture (e.g. Qwen2.5-VL-7B with a Qwen2.5-7B derivative)",
        )
    paired_l = {p.llm_name for p in pairs}
    used = consumed  # LLM tensors read through the view, under the VLM's expert layout
    roles = {n: vlay.role(n) for n in vlm.tensors}
    return Alignment(
        vlm_layout=vlay,
        llm_layout=llay,
        pairs=tuple(pairs),
        unmatched_lm=tuple(v for r, v in vrel.items() if r not in lrel),
        llm_only=tuple([n for r, n in lrel.items() if r not in vrel and n not in paired_l and n not in used] + llm_only_extra),
        vision=tuple(n for n, r in roles.items() if r in ("vision", "projector")),
        other=tuple(n for n, r in roles.items() if r == "other"),
        notes=tuple(notes),
        llm=view,
        vlm=vlm,
    )
