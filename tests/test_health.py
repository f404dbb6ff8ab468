"""The health rules without a Trainer: per-group numbers in, findings (with cause and fix) out; ``health.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ia3cli.config.recipe import MonitorSection
from ia3cli.training import health
from ia3cli.training.health import FINDINGS, Checks

CFG = MonitorSection(patience=2, vanishing_below=1e-6, exploding_above=100.0)
GROUPS = ["k", "v", "ff"]
OK_GRAD = {"k": 1e-2, "v": 1e-2, "ff": 1e-2}
OK_DRIFT = {"k": 1e-2, "v": 1e-2, "ff": 1e-2}


def feed(checks: Checks, rows: list[tuple[dict | None, dict]]) -> list[dict]:
    """Run one check per (grad_norm, drift) row, steps 1, 2, ...; return every finding in order."""
    found = []
    for step, (grad, drift) in enumerate(rows, start=1):
        found += checks.update(step, grad, drift)
    return found


# (name, rows of (grad_norm, drift), expected [(code, step, group)], words in the message)
CASES = [
    ("healthy", [(OK_GRAD, OK_DRIFT)] * 5, [], []),
    ("vanishing in one group", [({**OK_GRAD, "v": 1e-9}, OK_DRIFT)] * 3,
     [("vanishing_gradients", 2, "v")], ["'v' targets are wrong", "inspect-modules"]),
    ("vanishing everywhere", [({g: 0.0 for g in GROUPS}, OK_DRIFT)] * 3,
     [("vanishing_gradients", 2, None)], ["all groups", "labels masked out"]),
    ("one bad check is not a streak", [({**OK_GRAD, "k": 1e-9}, OK_DRIFT), (OK_GRAD, OK_DRIFT),
                                       ({**OK_GRAD, "k": 1e-9}, OK_DRIFT), (OK_GRAD, OK_DRIFT)], [], []),
    ("exploding", [({**OK_GRAD, "ff": 1e4}, OK_DRIFT)] * 2,
     [("exploding_gradients", 2, "ff")], ["above 100", "learning_rate", "clipping at 1", "max_grad_norm"]),
    ("not moving: the first check does not count", [(OK_GRAD, {g: 0.0 for g in GROUPS})] * 3,
     [("vectors_not_moving", 3, None)], ["have not left 1.0 after 3 steps", "learning_rate: 3e-3"]),
    ("not moving in one group", [(OK_GRAD, {**OK_DRIFT, "k": 0.0})] * 3,
     [("vectors_not_moving", 3, "k")], ["'k' vectors get no useful gradient"]),
    ("gradients not measured: only drift is checked", [(None, OK_DRIFT)] * 4, [], []),
    ("each finding once", [({**OK_GRAD, "v": 1e-9}, OK_DRIFT)] * 6, [("vanishing_gradients", 2, "v")], []),
]  # fmt: skip


@pytest.mark.parametrize(("name", "rows", "expected", "words"), CASES, ids=[c[0] for c in CASES])
def test_rules(name: str, rows: list, expected: list, words: list[str]) -> None:
    found = feed(Checks(CFG, 1.0, GROUPS), rows)
    assert [(f["code"], f["step"], f["group"]) for f in found] == expected
    for word in words:
        assert word in found[0]["message"]
    for f in found:
        assert ". likely cause: " in f["message"] and ". fix: " in f["message"]


def test_one_group_never_counts_as_all_groups() -> None:
    found = feed(Checks(CFG, 1.0, ["ff"]), [({"ff": 0.0}, {"ff": 1.0})] * 2)
    assert [(f["code"], f["group"]) for f in found] == [("vanishing_gradients", "ff")]


def test_every_rule_has_a_condition_cause_and_fix() -> None:
    assert set(FINDINGS) == {
        "vanishing_gradients",
        "exploding_gradients",
        "vectors_not_moving",
        "nonfinite_loss",
        "no_gain_over_base",
        "below_majority_class",
    }
    for code, rule in FINDINGS.items():
        assert rule.code == code and rule.measure in ("grad_norm", "drift", "any", "accuracy")
        assert all(rule.cause) and all(rule.fix)
    assert FINDINGS["vanishing_gradients"].condition(1e-7, CFG) and not FINDINGS["vanishing_gradients"].condition(
        1e-5, CFG
    )
    assert FINDINGS["exploding_gradients"].condition(101.0, CFG)
    assert FINDINGS["vectors_not_moving"].condition(0.0, CFG)
    assert FINDINGS["nonfinite_loss"].condition(math.nan, CFG) and FINDINGS["nonfinite_loss"].condition(math.inf, CFG)
    for code in ("no_gain_over_base", "below_majority_class"):  # the margin over the reference, noise deducted
        assert FINDINGS[code].condition(0.0, CFG) and not FINDINGS[code].condition(1e-9, CFG)


def test_nonfinite_finding_names_the_last_good_checkpoint() -> None:
    finding = health.nonfinite(7, ["k"], "runs/x/checkpoints/checkpoint-6")
    assert finding["code"] == "nonfinite_loss" and finding["step"] == 7 and finding["group"] is None
    assert "(groups: k)" in finding["message"] and "checkpoint-6" in finding["message"]
    assert "none saved yet" in health.nonfinite(1, [], None)["message"]


def test_last_good_checkpoint_exists_or_is_none(tmp_path: Path) -> None:
    saved = [str(tmp_path / f"checkpoint-{s}") for s in (8, 16, 24, 32)]
    assert health.last_good_checkpoint(saved) is None
    (tmp_path / "checkpoint-24").mkdir()
    assert health.last_good_checkpoint(saved) == saved[2]  # 32 was deleted by save_total_limit
    (tmp_path / "checkpoint-32").mkdir()
    assert health.last_good_checkpoint(saved) == saved[3]


@pytest.mark.parametrize(
    ("findings", "status", "line"),
    [
        ([], "ok", "health: ok (10 steps) | grad k 1.0e-02 | drift k 2.0e-01"),
        ([{"code": "vectors_not_moving", "step": 3, "group": None, "message": "m"}], "warning",
         "health: warning after 10 steps: vectors_not_moving (all groups); see health.json"),
        ([health.nonfinite(4, [], None)], "failed",
         "health: FAILED at step 4 (non-finite loss/gradient); last good checkpoint: c-2"),
    ],
)  # fmt: skip
def test_report_summary_and_file(tmp_path: Path, findings: list, status: str, line: str) -> None:
    final = {"grad_norm": {"k": 1e-2, "v": math.nan}, "drift": {"k": 0.2}, "at_init": {"k": 0.0}}
    report = health.report(findings, ["k", "v"], final, 10, "c-2", 1.0)
    assert report["status"] == status
    assert report["final"]["grad_norm"] == {"k": 1e-2, "v": None}  # non-finite and missing values are null
    assert report["final"]["drift"] == {"k": 0.2, "v": None}
    assert health.summary_line(report) == line
    path = health.write(tmp_path / "health.json", report)
    assert json.loads(path.read_text()) == report
    assert not [p for p in tmp_path.iterdir() if p.name != "health.json"]


def test_health_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, ia3cli.training.health; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
