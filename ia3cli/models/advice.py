"""Advice on a target plan: short names for printing, lint notes on a recipe's explicit targets, and how the plan
differs from PEFT's own default IA3 targets for the family. Plain text; PEFT is imported inside functions."""

from __future__ import annotations

from collections.abc import Iterable

from ia3cli.config.families import dotted_match
from ia3cli.models.matching import Module, Spec, feedforward, pattern, selected


def short(name_or_pattern: str) -> str:
    """A readable short name: the part after the last layer index (``self_attn.k_proj``, ``output.dense``)."""
    parts = pattern(name_or_pattern).split(".")
    if "*" in parts:
        tail = parts[len(parts) - parts[::-1].index("*") :]
        return ".".join(tail) if tail else name_or_pattern
    return name_or_pattern


def shorts(names: Iterable[str]) -> list[str]:
    """:func:`short` of each name, without repeats."""
    return list(dict.fromkeys(short(n) for n in names))


def _firsts(names: list[str]) -> list[str]:
    """One representative name per short name, in order (pairs with :func:`shorts`)."""
    seen: dict[str, str] = {}
    for n in names:
        seen.setdefault(short(n), n)
    return list(seen.values())


def lint(
    targeted: list[str], ff_names: list[str], ff_spec: Spec, mods: dict[str, Module], inter: int | None
) -> tuple[list[str], list[str]]:
    """Warnings (and notes) for explicit targets: feed-forward modules that are not down-projections, the reverse,
    and queries scaled instead of keys."""
    warnings: list[str] = []
    notes: list[str] = []
    ff_set = set(ff_names)
    downs = [n for n in targeted if mods[n].role == "ffn_down"]
    all_downs = [n for n, m in mods.items() if m.role == "ffn_down"]
    wrong_ff = [n for n in ff_names if inter is not None and mods[n].in_features != inter]
    if wrong_ff:
        fix = f"; the down-projection is {', '.join(shorts(all_downs))}" if all_downs else ""
        warnings.append(
            f"feed-forward {', '.join(shorts(wrong_ff))} has in_features {mods[wrong_ff[0]].in_features}, not the "
            f"intermediate size {inter}: IA3 scales the input of feed-forward modules, which should be the "
            f"intermediate activation{fix} (target it and list it in feedforward_modules)."
        )
    not_ff_downs = [n for n in downs if n not in ff_set]
    if not_ff_downs:
        warnings.append(
            f"{', '.join(shorts(not_ff_downs))} is an FFN down-projection targeted without being feed-forward: "
            "IA3 scales its output, not the intermediate activation; add it to feedforward_modules."
        )
    if isinstance(ff_spec, list):
        dotted = {n for n in targeted if any(dotted_match(e, n) for e in ff_spec)}
        surprise = [n for n in ff_names if n not in dotted]
        if surprise:
            warnings.append(
                f"PEFT matches feed-forward entries as plain suffixes, so {', '.join(shorts(surprise))} is treated "
                "as feed-forward too; use longer suffixes or a regex."
            )
    roles = {mods[n].role for n in targeted}
    if "attn_q" in roles and "attn_k" not in roles and "attn_qkv_fused" not in roles:
        q = shorts([n for n in targeted if mods[n].role == "attn_q"])
        k = shorts([n for n, m in mods.items() if m.role == "attn_k"])
        notes.append(
            f"targets scale queries ({', '.join(q)}) but not keys"
            + (f" ({', '.join(k)})" if k else "")
            + ": the IA3 paper scales keys and values."
        )
    return warnings, notes


def peft_default(model_type: str) -> dict | None:
    """PEFT's built-in ``{"target_modules", "feedforward_modules"}`` for this model type, or None."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    if model_type not in TARGETS:
        return None
    return {"target_modules": list(TARGETS[model_type]), "feedforward_modules": list(FF.get(model_type, []))}


def compare_with_peft(
    model_type: str,
    default: dict | None,
    mods: dict[str, Module],
    universe: list[str],
    mts: list[str],
    targeted: list[str],
    ff: list[str],
) -> list[str]:
    """Notes on how PEFT's built-in default for this model type differs from ``targeted``/``ff``."""
    if default is None:
        return [
            f"PEFT has no IA3 default for model type '{model_type}' (IA3Config without target_modules raises); "
            "ia3cli passes the targets above explicitly."
        ]
    p_targets = selected(default["target_modules"], universe, mts)
    p_ff = feedforward(default["feedforward_modules"], p_targets)
    notes: list[str] = []
    for entry in default["target_modules"]:
        if not selected([entry], universe):
            notes.append(f"PEFT's default entry '{entry}' matches no module here; PEFT would skip it silently.")
    extra = [n for n in p_targets if n not in set(targeted)]
    missing = [n for n in targeted if n not in set(p_targets)]
    if extra or missing:

        def described(names: list[str]) -> str:
            return ", ".join(f"{short(n)} ({mods[n].role if n in mods else 'not linear'})" for n in _firsts(names))

        parts = []
        if extra:
            parts.append(f"also scales {described(extra)}")
        if missing:
            parts.append(f"does not scale {described(missing)}")
        roles_extra = {mods[n].role for n in extra if n in mods}
        roles_missing = {mods[n].role for n in missing if n in mods}
        why = "; the IA3 paper scales keys, values and the FFN down-projection's input"
        if "attn_q" in roles_extra and "attn_k" in roles_missing:
            why = " - queries instead of keys; the IA3 paper scales keys and values"
        notes.append(f"PEFT's default {default['target_modules']} {' and '.join(parts)}{why}.")
    ff_extra = [n for n in p_ff if n not in set(ff)]
    if ff_extra:
        notes.append(
            f"PEFT's default treats {', '.join(shorts(ff_extra))} as feed-forward too (its feed-forward entries "
            "are plain suffixes), scaling their input instead of their output."
        )
    if not notes:
        notes.append(f"Same modules as PEFT's default {default['target_modules']}.")
    return notes
