"""The op registry: every micro-op of a cycle, defined once.

Each op has the clock-cycle verb the course uses (``qkv``, ``scores``, ``softmax``, ``mix``,
``mlp_in``, …), the stage it belongs to, the tensors its event carries, and, for each tensor,
the name TransformerLens gives the same activation, so a learner who knows TransformerLens
finds their way (``softmax`` is ``blocks.L.attn.hook_pattern``, ``mix`` is
``blocks.L.attn.hook_z``, ``residual_mlp`` is ``blocks.L.hook_resid_post``).

Two false friends:

* ``mlp_in`` is the MLP's *pre-activation* (after its first matrix), TransformerLens's
  ``mlp.hook_pre``, not the MLP's input (that is ``norm_mlp``, TL's ``ln2.hook_normalized``);
* GPT-2's ``positions`` output is the embedding *plus* the learned positions, the stream that
  enters block 0: TL's ``blocks.0.hook_resid_pre``, not ``hook_pos_embed`` (the positions alone).

Layouts differ too: per-head tensors here are ``(batch, heads, positions, head_dim)``; in
TransformerLens ``hook_q``/``hook_z`` are ``(batch, positions, heads, head_dim)``.
Tensors with no TransformerLens counterpart (the KV cache, RoPE's tables, the logits) get a
name of the same shape: ``blocks.L.<op>.<tensor>`` or ``<op>.<tensor>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from cyclelab.core.families import FAMILIES, Family, supported_text


class Stage(str, Enum):
    """The four stages of one cycle."""

    FETCH = "FETCH"
    READ = "READ"
    EXECUTE = "EXECUTE"
    WRITEBACK = "WRITEBACK"


@dataclass(frozen=True)
class Op:
    """One micro-op: its name, stage, whether it runs once per layer, and its tensors' TL names.

    ``tensors`` maps each tensor key of the op's event to its TransformerLens hook (``{L}`` for
    the layer) or None where TransformerLens has none; ``llama`` replaces it in the families
    whose declaration has the switch ``switch`` on (:mod:`cyclelab.core.families`): ``"rope"``
    (RoPE tables instead of learned positions) or ``"gated"`` (a gated MLP), as in Llama.
    """

    name: str
    stage: Stage
    per_layer: bool
    tensors: dict[str, str | None]
    llama: dict[str, str | None] | None = None
    switch: str = "rope"

    def tensors_for(self, family: str) -> dict[str, str | None]:
        """The op's tensors in a model family (a key of :data:`~cyclelab.core.families.FAMILIES`)."""
        on = self.llama is not None and getattr(family_switches(family), self.switch)
        return self.llama if on and self.llama is not None else self.tensors

    def hook_name(self, key: str, layer: int | str | None, family: str = "gpt2") -> str:
        """The name of tensor ``key`` of this op at ``layer``: TransformerLens's where it has one."""
        tensors = self.tensors_for(family)
        if key not in tensors:
            raise ValueError(f"op {self.name!r} has no tensor {key!r}; it has {', '.join(tensors) or 'none'}")
        hook = tensors[key]
        if hook is None:
            hook = f"blocks.{{L}}.{self.name}.{key}" if self.per_layer else f"{self.name}.{key}"
        return hook.format(L=layer)


_F, _R, _E, _W = Stage.FETCH, Stage.READ, Stage.EXECUTE, Stage.WRITEBACK
REGISTRY: dict[str, Op] = {
    op.name: op
    for op in [
        Op("embed", _F, False, {"out": "hook_embed"}),
        Op("positions", _F, False, {"out": "blocks.0.hook_resid_pre"}, llama={"cos": None, "sin": None}),
        Op("norm_attn", _E, True, {"out": "blocks.{L}.ln1.hook_normalized"}),
        Op(
            "qkv",
            _R,
            True,
            {"q": "blocks.{L}.attn.hook_q", "k": "blocks.{L}.attn.hook_k", "v": "blocks.{L}.attn.hook_v"},
        ),
        Op("rope", _E, True, {}, llama={"q": "blocks.{L}.attn.hook_rot_q", "k": "blocks.{L}.attn.hook_rot_k"}),
        Op("kv_cache", _R, True, {"keys": None, "values": None}),
        Op("scores", _E, True, {"scores": "blocks.{L}.attn.hook_attn_scores"}),
        Op("softmax", _E, True, {"probs": "blocks.{L}.attn.hook_pattern"}),
        Op("mix", _E, True, {"out": "blocks.{L}.attn.hook_z"}),
        Op("attn_out", _E, True, {"out": "blocks.{L}.hook_attn_out"}),
        Op("residual_attn", _E, True, {"out": "blocks.{L}.hook_resid_mid"}),
        Op("norm_mlp", _E, True, {"out": "blocks.{L}.ln2.hook_normalized"}),
        Op(
            "mlp_in",
            _E,
            True,
            {"out": "blocks.{L}.mlp.hook_pre"},
            llama={"gate": "blocks.{L}.mlp.hook_pre", "up": "blocks.{L}.mlp.hook_pre_linear"},
            switch="gated",
        ),
        Op("act", _E, True, {"out": "blocks.{L}.mlp.hook_post"}),
        Op("mlp_out", _E, True, {"out": "blocks.{L}.hook_mlp_out"}),
        Op("residual_mlp", _E, True, {"out": "blocks.{L}.hook_resid_post"}),
        Op("norm_final", _W, False, {"out": "ln_final.hook_normalized"}),
        Op("logits", _W, False, {"out": None}),
        Op("choose", _W, False, {"logits": None}),
        Op("append", _W, False, {}),
    ]
}
OPS = list(REGISTRY)  #: every op an engine run yields, in order ("rope" only for RoPE families)


def stage_of(op: str) -> Stage:
    """The stage of ``op`` (a ValueError names the known ops)."""
    return registry_entry(op).stage


def registry_entry(op: str) -> Op:
    """The :class:`Op` called ``op``."""
    if op not in REGISTRY:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    return REGISTRY[op]


def hook_names(family: str) -> dict[str, tuple[str, str]]:
    """Every TransformerLens-style name of a forward pass in a model family, with ``{L}`` for the
    layer, mapped to ``(op, tensor key)``: the alias table."""
    rope = family_switches(family).rope
    names = {
        op.hook_name(key, "{L}" if op.per_layer else None, family): (op.name, key)
        for op in REGISTRY.values()
        if op.name not in ("choose", "append")
        for key in op.tensors_for(family)
    }
    if rope:  # no positions are added: the stream entering block 0 is the embedding
        names["blocks.0.hook_resid_pre"] = ("embed", "out")
    return names


def family_switches(family: str) -> Family:
    """The declaration of ``family`` (a ``model_type``), or a ValueError listing the families."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; the engine runs {supported_text()}")
    return FAMILIES[family]


def alias_table(family: str = "gpt2") -> str:
    """The alias table as text: op, tensor, stage and the TransformerLens-style name."""
    rows = [("op", "tensor", "stage", "name (TransformerLens's, where it has one)")]
    for name, (op, key) in hook_names(family).items():  # in the order of a cycle
        rows.append((op, key, REGISTRY[op].stage.value, name))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
