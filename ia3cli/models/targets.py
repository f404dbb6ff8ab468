"""IA3 target modules from the model config alone: which modules to scale, how many vectors, what it costs.

IA3 (Liu et al. 2022) multiplies the keys, the values and the intermediate FFN activation by learned vectors. In
PEFT terms that is ``target_modules`` = the key and value projections plus the FFN down-projection, and
``feedforward_modules`` = the down-projection (its *input*, the intermediate activation, is scaled; other targets
have their *output* scaled). Getting these names wrong is silent in PEFT: list entries that match nothing are
skipped, and several of PEFT's built-in defaults differ from the paper (queries instead of keys for qwen2/3, gemma,
phi; queries and keys for OPT; BERT's ``output.dense`` also hits ``attention.output.dense``; no DistilBERT entry).

Everything here runs on a model built on the ``meta`` device from its config (``modeling.build_meta_model``): no
weights are read or allocated, so a 70B config answers in seconds. Roles come from the family table
(:mod:`ia3cli.config.families`) or, for families it does not know, from shapes and name hints; which modules a spec
selects
is PEFT's own decision (:mod:`ia3cli.models.matching`).

Torch, transformers and PEFT are imported inside functions: ``ia3 --help`` must not import them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ia3cli.config.families import (
    FAMILIES,
    group_of,
    in_block,
)
from ia3cli.config.recipe import AdapterSection, ModelSection
from ia3cli.errors import RecipeError
from ia3cli.models import loading as modeling
from ia3cli.models import module_tree as tree
from ia3cli.models.advice import compare_with_peft, lint, peft_default
from ia3cli.models.matching import (
    Module,
    Spec,
    check_feedforward,
    check_targets,
    express_ff,
    express_targets,
    feedforward,
    selected,
)

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig


@dataclass
class TargetPlan:
    """The IA3 targets for one model, how they were found, and what they cost.

    Args:
        model_type: ``config.model_type``.
        target_modules: For ``IA3Config``: a list of name suffixes, or one regex over full module names.
        feedforward_modules: For ``IA3Config``: the targets whose input is scaled (same forms).
        ia3_params: IA3 vector entries PEFT creates: ``out_features`` per target, ``in_features`` per feed-forward.
        lora_r8_params: A LoRA adapter of rank 8 on the same modules: ``8 * (in + out)`` each, for comparison.
        adapter_bytes_fp32: ``adapter_model.safetensors`` size in float32: 4 bytes per entry plus the header
            (tensor names, shapes, offsets). Exact for PEFT 0.21 IA3 vectors; ``modules_to_save`` (the ``seq-cls``
            head) are saved in full on top.
        adapter_bytes_fp16: The same in float16/bfloat16.
        warnings: Likely mistakes, each with the fix.
        notes: How the plan was made and how it differs from PEFT's default.
        method: ``family`` (known family table), ``shape-analysis`` (unknown family) or ``explicit`` (recipe's list).
        peft_default: PEFT's built-in ``{"target_modules", "feedforward_modules"}`` for this model type, or None.
        modules: Linear-like modules grouped by name pattern (layer index as ``*``): pattern, count, in_features,
            out_features, kind, role, targeted, feedforward (and targeted_count when only some are targeted).
        task: The head the plan was made for (module names depend on it).
        hidden_size: Model width, from the config or the shapes.
        intermediate_size: FFN inner width, from the config or the shapes (None when not found).
        targeted_names: Full names of the modules PEFT will wrap.
        feedforward_names: The subset of ``targeted_names`` treated as feed-forward.
        head_modules: Top-level modules of a ``seq-cls`` head (randomly initialised; train them via
            ``modules_to_save``: PEFT adds only ``classifier`` and ``score`` by itself).
        fan_in_fan_out: True when a target is a ``Conv1D`` (GPT-2 style, weight stored as (in, out)).
        modules_to_save: What ``IA3Config.modules_to_save`` receives (``modeling.modules_to_save``); targets are
            matched with exactly this list (plus PEFT's own ``classifier``/``score`` for ``seq-cls``) excluded.
        groups: Health-monitor group of each targeted module (``families.group_of``): q, k, v, qkv, ff, other.
    """

    model_type: str
    target_modules: list[str] | str
    feedforward_modules: list[str] | str
    ia3_params: int
    lora_r8_params: int
    adapter_bytes_fp32: int
    adapter_bytes_fp16: int
    warnings: list[str]
    notes: list[str]
    method: str
    peft_default: dict | None
    modules: list[dict]
    task: str = "causal-lm"
    hidden_size: int | None = None
    intermediate_size: int | None = None
    targeted_names: list[str] = field(default_factory=list)
    feedforward_names: list[str] = field(default_factory=list)
    head_modules: list[str] = field(default_factory=list)
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    groups: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The plan as a JSON-ready dict (every field)."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# module scan, roles and sizes


# ---------------------------------------------------------------------------------------------------------------
# plans


def _roles(
    model: torch.nn.Module, config: PretrainedConfig, task: str, mods: dict[str, Module], use_family_table: bool
) -> tuple[list[str], int | None, int | None, str, list[str]]:
    """Mark heads and give every module its role (family table, else shapes); returns the head roots, the hidden and
    intermediate sizes, how roles were found (``family`` or ``shape-analysis``) and notes for the user."""
    model_type = str(getattr(config, "model_type", "unknown"))
    heads, head_roots = tree.head_roots(model, task)
    for m in mods.values():
        if m.name in heads or tree.is_under(m.name, head_roots):
            m.role = "head"
    family = FAMILIES.get(model_type) if use_family_table else None
    hidden, inter = tree.sizes(config, mods, family)
    if family is not None:
        tree.assign_roles_family(mods, family.roles)
        return head_roots, hidden, inter, "family", [f"Roles from ia3cli's table for '{model_type}'."]
    tree.assign_roles_shapes(mods, hidden, inter)
    note = (
        f"'{model_type}' is not in ia3cli's family table: roles come from shape analysis (the down-projection "
        f"is the linear whose input is the intermediate size {inter}) and name hints (k/key, v/value). "
        "Check the table below."
    )
    return head_roots, hidden, inter, "shape-analysis", [note]


def _specs(
    adapter: AdapterSection | None, mods: dict[str, Module], universe: list[str], mts: list[str], notes: list[str]
) -> tuple[Spec, Spec, list[str]]:
    """The ``target_modules`` and ``feedforward_modules`` specs (the paper's selection, or the recipe's entries
    checked against the tree) and warnings; notes are appended to ``notes``."""
    rec_targets, rec_ff, rec_warnings = tree.paper_selection(mods)
    explicit_t = adapter is not None and adapter.target_modules != "auto"
    explicit_f = adapter is not None and adapter.feedforward_modules != "auto"
    if adapter is None or not (explicit_t or explicit_f):
        target_spec: Spec = express_targets(rec_targets, universe)
        return target_spec, express_ff(target_spec, rec_targets, rec_ff, universe), list(rec_warnings)
    warnings: list[str] = []
    if adapter.target_modules == "all-linear":
        inside = [n for n, m in mods.items() if m.linear and in_block(n) and m.role != "head"]
        picked = selected(inside, universe, mts)
        target_spec = express_targets(picked, universe)
        notes.append(f"'all-linear' expanded to {len(picked)} linear layers inside the blocks (heads excluded).")
    elif explicit_t:
        target_spec = check_targets(adapter.target_modules, universe, mods, mts)
    else:
        target_spec = express_targets(rec_targets, universe)
        warnings += rec_warnings
    targeted = selected(target_spec, universe, mts)
    if explicit_f:
        ff_spec = check_feedforward(adapter.feedforward_modules, target_spec, targeted, universe, mods)
    else:
        ff_spec = express_ff(target_spec, targeted, [n for n in rec_ff if n in set(targeted)], universe)
        notes.append(
            "feedforward_modules is auto: the recommended feed-forward modules (FFN down-projections) among "
            "your targets."
        )
    return target_spec, ff_spec, warnings


def plan_for_model(
    model: torch.nn.Module,
    config: PretrainedConfig,
    task: str,
    adapter: AdapterSection | None = None,
    *,
    use_family_table: bool = True,
) -> TargetPlan:
    """Plan IA3 targets on an already built model (meta or real, quantised or not).

    Args:
        model: The task model (module names must be the ones PEFT will see).
        config: Its config.
        task: ``seq-cls``, ``causal-lm`` or ``seq2seq``.
        adapter: The recipe's adapter section; None (or ``auto`` for both keys) recommends the paper recipe.
        use_family_table: False forces shape analysis, as for a family ia3cli does not know.

    Raises:
        RecipeError: on ``adapter.target_modules`` / ``adapter.feedforward_modules`` for entries that match no
            module, match a non-linear module, or feed-forward entries that are not targets.
    """
    universe, mods = tree.scan(model)
    model_type = str(getattr(config, "model_type", "unknown"))
    head_roots, hidden, inter, method, notes = _roles(model, config, task, mods, use_family_table)
    # exactly what IA3Config receives, and what PEFT's model then excludes from targets
    to_save = modeling.modules_to_save(task, adapter.modules_to_save if adapter else None, head_roots)
    mts = modeling.peft_modules_to_save(task, to_save)
    target_spec, ff_spec, warnings = _specs(adapter, mods, universe, mts, notes)
    if adapter is not None and (adapter.target_modules != "auto" or adapter.feedforward_modules != "auto"):
        method = "explicit"
    targeted = selected(target_spec, universe, mts)
    ff_names = feedforward(ff_spec, targeted)
    if not targeted and adapter is not None:  # recommend() still shows the table, with a warning
        raise RecipeError(
            "adapter.target_modules",
            f"selects no module of this '{model_type}' model",
            "list the key/value/down-projection names explicitly; `ia3 inspect-modules MODEL` shows them",
        )
    if method == "explicit":
        lint_warnings, lint_notes = lint(targeted, ff_names, ff_spec, mods, inter)
        warnings += lint_warnings
        notes += lint_notes
    ff_set = set(ff_names)
    ia3, lora, b32, b16 = tree.counts(mods, targeted, ff_set)
    default = peft_default(model_type)
    notes += compare_with_peft(model_type, default, mods, universe, mts, targeted, ff_names)
    if head_roots:
        notes.append(
            f"The classification head ({', '.join(head_roots)}) is new and must train in full: ia3cli passes it in "
            "modules_to_save (PEFT adds only 'classifier'/'score' by itself)."
        )
    return TargetPlan(
        model_type=model_type,
        target_modules=target_spec,
        feedforward_modules=ff_spec,
        ia3_params=ia3,
        lora_r8_params=lora,
        adapter_bytes_fp32=b32,
        adapter_bytes_fp16=b16,
        warnings=warnings,
        notes=notes,
        method=method,
        peft_default=default,
        modules=tree.table(mods, set(targeted), ff_set),
        task=task,
        hidden_size=hidden,
        intermediate_size=inter,
        targeted_names=targeted,
        feedforward_names=ff_names,
        head_modules=head_roots,
        fan_in_fan_out=any(mods[n].kind == "Conv1D" for n in targeted),
        modules_to_save=to_save,
        groups={n: group_of(mods[n].role if n in mods else None, n in ff_set) for n in targeted},
    )


def recommend(model: ModelSection, task: str | None = None, num_labels: int = 2) -> TargetPlan:
    """The paper recipe from the config alone: keys, values and the FFN down-projection (feed-forward).

    Where keys and values live in a fused QKV module, that module is recommended and a warning says Q is scaled too.
    Notes say how PEFT's built-in default for the family differs.

    Args:
        model: The recipe's model section.
        task: The head to plan for; None infers it from the config (``modeling.default_task``: its
            ``architectures``, else the family's first task). Module names (hence regexes) depend on it.
        num_labels: Classes of a seq-cls head.

    Raises:
        RecipeError: when the config cannot be loaded (``model.name``) or has no model for the task (``model.task``).
    """
    config = modeling.load_config(model)
    task = task or modeling.default_task(config)
    meta = modeling.build_meta_model(config, task, num_labels, trust_remote_code=model.trust_remote_code)
    return plan_for_model(meta, config, task)


def resolve(model: ModelSection, adapter: AdapterSection, task: str, num_labels: int = 2) -> TargetPlan:
    """The targets a recipe will train, checked on the meta model.

    ``auto`` for both keys is :func:`recommend`; ``all-linear`` targets every linear layer inside the blocks (heads
    excluded), the FFN down-projections among them feed-forward. Explicit entries must each match at least one
    linear-like module (list: ``name == entry`` or ``name.endswith('.' + entry)``; a string: one regex,
    ``re.fullmatch`` on full names).
    Feed-forward modules must be targets. With explicit targets and ``feedforward_modules: auto`` the feed-forward
    modules are the recommended ones (FFN down-projections) among the targets; with ``target_modules: auto`` and an
    explicit feed-forward list, the targets are the recommended ones. Warnings flag feed-forward modules whose input
    is not the intermediate activation (DistilBERT ``lin1`` instead of ``lin2``), down-projections not marked
    feed-forward, and queries scaled instead of keys.

    Args:
        model: The recipe's model section.
        adapter: The recipe's adapter section.
        task: ``seq-cls``, ``causal-lm`` or ``seq2seq``.
        num_labels: Classes of a seq-cls head.

    Raises:
        RecipeError: on ``model.name``/``model.task`` when the model cannot be built; on ``adapter.target_modules``
            naming each entry that matches no (linear) module, with close names; on
            ``adapter.feedforward_modules`` naming entries that are not targets.
    """
    config = modeling.load_config(model)
    meta = modeling.build_meta_model(config, task, num_labels, trust_remote_code=model.trust_remote_code)
    return plan_for_model(meta, config, task, adapter)
