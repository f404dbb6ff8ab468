"""PEFT's own matching rules applied to a scanned module tree: which modules a spec selects, and how to write a set of
modules back as a spec PEFT accepts; checks of explicit recipe entries and advice on likely mistakes.

Which modules an ``IA3Config`` wraps is decided by PEFT 0.21 itself: :func:`selected` builds a real ``IA3Config``
(with the exact ``modules_to_save`` the model will exclude) and asks ``peft.tuners.tuners_utils.
check_target_module_exists`` about every module name; feed-forward membership is ``IA3Model.
_check_target_module_feedforward``. In short:

* a list entry targets module ``name`` when ``name == entry`` or ``name.endswith("." + entry)``;
* a string is a regex, ``re.fullmatch``-ed against the full module name;
* a feed-forward *list* entry matches a target when ``name.endswith(entry)`` (no dot boundary!), a string by
  ``re.fullmatch``; and when both are lists PEFT requires every feed-forward entry to appear in ``target_modules``;
* modules matched by ``modules_to_save`` are never wrapped.

PEFT is imported inside functions: importing this module imports no torch.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ia3cli.config.families import dotted_match
from ia3cli.errors import RecipeError

Spec = list[str] | str


@dataclass
class Module:
    """A wrappable module of the scanned model.

    Args:
        name: Full module name.
        kind: Class name (``Linear``, ``Conv1D``, ``Linear4bit``, ...).
        in_features: Input width.
        out_features: Output width.
        linear: Linear/Conv1D (and bitsandbytes subclasses); Conv2d/Conv3d are wrappable but not linear-like.
        role: From the family table or shape analysis (see :mod:`ia3cli.config.families`).
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    linear: bool
    role: str = "other"


def _config(spec: Spec, modules_to_save: list[str]) -> Any:
    """An ``IA3Config`` as PEFT's model sees it: these targets, these modules excluded."""
    from peft import IA3Config

    return IA3Config(target_modules=spec, feedforward_modules=[], modules_to_save=list(modules_to_save) or None)


def selected(spec: Spec, names: Iterable[str], modules_to_save: Iterable[str] = ()) -> list[str]:
    """The names PEFT wraps for ``target_modules=spec``, in order.

    Args:
        spec: A list of suffixes or one regex.
        names: Every module name of the model (PEFT tests each one).
        modules_to_save: The list PEFT's model excludes (``modeling.peft_modules_to_save``).
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    config = _config(spec, list(modules_to_save))
    return [n for n in names if check_target_module_exists(config, n)]


def feedforward(spec: Spec, targeted: Iterable[str]) -> list[str]:
    """The targets PEFT treats as feed-forward for ``feedforward_modules=spec`` (its input is scaled)."""
    from peft import IA3Config
    from peft.tuners.ia3 import IA3Model

    config = IA3Config(target_modules=None, feedforward_modules=spec)
    return [n for n in targeted if IA3Model._check_target_module_feedforward(config, n)]


# ---------------------------------------------------------------------------------------------------------------
# writing a set of modules back as a spec


def pattern(name: str) -> str:
    """The name with layer indices as ``*`` (``model.layers.*.mlp.down_proj``)."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _as_list(chosen_names: list[str], universe: list[str]) -> list[str] | None:
    """Shortest suffixes (no layer index) whose PEFT list matching selects exactly ``chosen``; None if impossible."""
    chosen = set(chosen_names)
    others = [n for n in universe if n not in chosen]
    entries: list[str] = []
    done: set[str] = set()
    for name in chosen_names:
        if pattern(name) in done:
            continue
        done.add(pattern(name))
        for depth in range(1, 4):
            parts = name.split(".")[-depth:]
            if any(p.isdigit() for p in parts) or depth > name.count(".") + 1:
                return None
            entry = ".".join(parts)
            if not any(dotted_match(entry, o) for o in others):
                if entry not in entries:
                    entries.append(entry)
                break
        else:
            return None
    if set(selected(entries, universe)) != chosen:
        return None
    return entries


def _as_regex(chosen_names: list[str], universe: list[str]) -> str:
    """One regex, ``re.fullmatch``-ed on full names, selecting exactly ``chosen`` from ``universe``."""
    chosen = set(chosen_names)
    others = [n for n in universe if n not in chosen]
    alts: list[str] = []
    anchored = False
    done: set[str] = set()
    for name in chosen_names:
        if pattern(name) in done:
            continue
        done.add(pattern(name))
        depth_max = name.count(".") + 1
        for depth in range(1, depth_max + 1):
            alt = r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in name.split(".")[-depth:])
            if depth == depth_max:
                anchored = True
                break
            rx = re.compile(rf"(?:.*\.)?(?:{alt})")
            if not any(rx.fullmatch(o) for o in others):
                break
        if alt not in alts:
            alts.append(alt)
    if not alts:
        return "$^"
    prefix = r"(?:.*\.)?" if anchored else r".*\."
    body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
    regex = prefix + body
    if set(selected(regex, universe)) != chosen:  # cannot happen; keep the plan exact anyway
        regex = "|".join(re.escape(n) for n in chosen_names)
    return regex


def express_targets(chosen: list[str], universe: list[str]) -> Spec:
    """A ``target_modules`` spec selecting exactly ``chosen``: a suffix list where possible, else one regex."""
    return _as_list(chosen, universe) or _as_regex(chosen, universe)


def express_ff(target_spec: Spec, targeted: list[str], ff: list[str], universe: list[str]) -> Spec:
    """Feed-forward spec selecting exactly ``ff`` among ``targeted`` under PEFT's rules: a list where PEFT's
    literal-subset check and suffix rule allow it, else a regex that selects exactly ``ff`` among *all* modules (so
    it reads right on its own, although PEFT applies it to targets only)."""
    if not ff:
        return []
    wanted = set(ff)
    if isinstance(target_spec, list):
        entries = [
            e
            for e in target_spec
            if any(n.endswith(e) for n in wanted) and not any(n.endswith(e) for n in targeted if n not in wanted)
        ]
        if set(feedforward(entries, targeted)) == wanted:
            return entries
    return _as_regex(ff, universe)


# ---------------------------------------------------------------------------------------------------------------
# explicit recipe entries


def _close_names(entry: str, mods: dict[str, Module]) -> list[str]:
    suffixes: set[str] = set()
    for n in mods:
        parts = n.split(".")
        for depth in (1, 2):
            if len(parts) >= depth and not any(p.isdigit() for p in parts[-depth:]):
                suffixes.add(".".join(parts[-depth:]))
    return difflib.get_close_matches(entry, sorted(suffixes), n=4, cutoff=0.5)


def _entries(key: str, spec: Spec) -> list[tuple[str, Spec]]:
    """(label, one-entry spec) pairs to test one by one; a regex must compile."""
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as exc:
            raise RecipeError(key, f"'{spec}' is not a valid regex: {exc}") from None
        return [(spec, spec)]
    return [(e, [e]) for e in spec]


def check_targets(spec: Spec, universe: list[str], mods: dict[str, Module], mts: list[str]) -> Spec:
    """Every entry must select at least one wrappable module, and nothing PEFT cannot wrap.

    Raises:
        RecipeError: on ``adapter.target_modules`` naming each bad entry, with close names.
    """
    key = "adapter.target_modules"
    if isinstance(spec, list) and not spec:
        raise RecipeError(key, "is an empty list", "use `auto` or `all-linear`, or list module-name suffixes")
    problems: list[str] = []
    hints: list[str] = []
    for label, one in _entries(key, spec):
        hits = selected(one, universe, mts)
        if not hits:
            problems.append(f"entry '{label}' matches no module")
            close = _close_names(label.rsplit(".", 1)[-1], mods) if isinstance(one, list) else []
            if isinstance(one, str) and re.fullmatch(r"[\w.]+", label):
                hints.append(
                    "a single string is a regex matched against FULL module names (e.g. "
                    f"'{next(iter(mods), 'model.layers.0.self_attn.k_proj')}'); for suffixes write a list: [{label}]"
                )
            elif close:
                hints.append(f"close names: {', '.join(close)}")
            continue
        bad = [n for n in hits if n not in mods]
        if bad:
            problems.append(
                f"entry '{label}' matches {bad[0]}, which is not a linear layer (PEFT's IA3 cannot wrap it)"
            )
            hints.append("name the linear layers inside it; `ia3 inspect-modules` lists them")
    if problems:
        hints.append("`ia3 inspect-modules MODEL` lists every linear layer with its role")
        message = problems[0] if len(problems) == 1 else "; ".join(problems)
        raise RecipeError(key, message, "; ".join(dict.fromkeys(hints)))
    return spec


def check_feedforward(
    spec: Spec, target_spec: Spec, targeted: list[str], universe: list[str], mods: dict[str, Module]
) -> Spec:
    """Feed-forward entries must select targeted modules only, and (both lists) appear in target_modules.

    Raises:
        RecipeError: on ``adapter.feedforward_modules`` naming the entries that are not targets or match none.
    """
    key = "adapter.feedforward_modules"
    if spec == "all-linear":
        raise RecipeError(key, "'all-linear' is a target_modules value", "use `auto` (the FFN down-projections)")
    entries = _entries(key, spec)
    if isinstance(spec, list) and isinstance(target_spec, list):
        outside = [e for e in spec if e not in target_spec]
        if outside:
            raise RecipeError(
                key,
                f"{', '.join(repr(e) for e in outside)} not in target_modules (PEFT requires feed-forward entries "
                "to be a subset of target_modules)",
                f"add {', '.join(outside)} to adapter.target_modules, or remove it here",
            )
    targeted_set = set(targeted)
    not_subset: list[str] = []
    unmatched: list[str] = []
    for label, one in entries:
        # which modules does the entry *name* (target rule), and which targets does PEFT treat as ff (ff rule)
        named = [n for n in selected(one, universe) if n in mods]
        if any(n not in targeted_set for n in named):
            not_subset.append(label)
        elif not feedforward(one, targeted):
            unmatched.append(label)
    if not_subset:
        raise RecipeError(
            key,
            f"{', '.join(repr(e) for e in not_subset)} selects modules that are not targets; feed-forward modules "
            "must be a subset of target_modules",
            "add them to adapter.target_modules, or drop them from feedforward_modules",
        )
    if unmatched:
        raise RecipeError(
            key,
            f"entry {', '.join(repr(e) for e in unmatched)} matches no targeted module",
            "see `ia3 inspect-modules`",
        )
    return spec


# ---------------------------------------------------------------------------------------------------------------
# advice: likely mistakes, and how PEFT's built-in default differs
