"""keep.keep_rule, the whole keep/discard decision, as a table: ledger rows so far + a run → status, new best."""
import pandas as pd
import pytest

from driver.keep import keep_rule
from driver.record import keep_best_submission
import prepare

FULL, SMOKE = "v1", "v1-smoke2w"


def ledger(*rows) -> pd.DataFrame:
    """Rows (commit, status, val_ppl, protocol), shaped as ledger.read_ledger returns them."""
    frame = pd.DataFrame([{"experiment": i, "commit": c, "status": s, "val_ppl": v, "protocol": p}
                          for i, (c, s, v, p) in enumerate(rows)])
    return frame.reindex(columns=prepare.LEDGER_COLUMNS)


def scored(ppl: float, protocol: str = FULL) -> dict:
    return {"val_ppl": ppl, "protocol": protocol}


NOISY = ledger(("a", "baseline", 20.5, FULL), ("a", "baseline", 19.5, FULL))  # mean 20, σ 0.707: 2σ = 1.41
ONE = ledger(("a", "baseline", 20.0, FULL))
CRASHED_BASELINES = ledger(("a", "crash", None, None), ("a", "timeout", None, None))
SMOKE_NIGHT = ledger(("a", "baseline", 10.0, SMOKE), ("b", "keep", 9.0, SMOKE))
BOTH = ledger(("a", "baseline", 10.0, SMOKE), ("b", "keep", 9.0, SMOKE), ("b", "baseline", 20.0, FULL))
CONFIRMED = ledger(*NOISY[["commit", "status", "val_ppl", "protocol"]].itertuples(index=False),
                   ("c", "keep", 18.0, FULL), ("c", "keep", 19.0, FULL))  # commit c: mean 18.5

CASES = {
    # name: (rows, result, confirm, baseline, strict, → status, best, reason contains)
    "first baseline": (ledger(), scored(20.0), None, True, False, "baseline", 20.0, "run 1: mean 20"),
    "repeated baseline: the mean": (ONE, scored(21.0), None, True, False, "baseline", 20.5, "run 2: mean 20.5"),
    "crashed baselines do not count": (CRASHED_BASELINES, scored(20.0), None, True, False, "baseline", 20.0, "run 1"),
    "a crashed baseline is a crash": (ledger(), {"status": "crash", "reason": "boom"}, None, True, False, "crash", None,
                                      "boom"),
    "no baseline: never kept": (CRASHED_BASELINES, scored(1.0), None, False, False, "discard", None,
                                "no scored baseline"),
    "clear gain: keep at once": (NOISY, scored(15.0), None, False, False, "keep", 15.0, "val_ppl improved"),
    "worse: discard": (NOISY, scored(25.0), None, False, False, "discard", 20.0, "not lower"),
    "equal: discard": (NOISY, scored(20.0), None, False, False, "discard", 20.0, "not lower"),
    "marginal gain: confirm first": (NOISY, scored(19.0), None, False, False, "confirm", 20.0, "within 2 noise widths"),
    "confirmed: keep the mean": (NOISY, scored(19.0), scored(19.4), False, False, "keep", 19.2, "mean 19.2 vs best 20"),
    "confirmation rejects": (NOISY, scored(19.0), scored(21.4), False, False, "discard", 20.0, "mean 20.2 vs best 20"),
    "confirmation crashed": (NOISY, scored(19.0), {"status": "crash", "reason": "oom"}, False, False, "discard", 20.0,
                             "confirmation run failed (oom)"),
    "strict: any lower keeps": (NOISY, scored(19.9), None, False, True, "keep", 19.9, "val_ppl improved"),
    "one baseline, no noise: keep at once": (ONE, scored(19.9), None, False, False, "keep", 19.9, "improved"),
    "crash": (NOISY, {"status": "crash", "reason": "train.py exited with 1"}, None, False, False, "crash", 20.0, "exited"),
    "timeout": (NOISY, {"status": "timeout", "reason": "ran past"}, None, False, False, "timeout", 20.0, "ran past"),
    "per-commit means: beat 18.5, not 18": (CONFIRMED, scored(18.2), None, False, True, "keep", 18.2, "best 18.5"),
    "smoke scores are not compared with full ones": (BOTH, scored(15.0), None, False, False, "keep", 15.0,
                                                     "protocol v1"),
    "full scores are not compared with smoke ones": (BOTH, scored(8.5, SMOKE), None, False, False, "keep", 8.5,
                                                     "protocol v1-smoke2w"),
    "a full run after a smoke night has no baseline": (SMOKE_NIGHT, scored(5.0), None, False, False, "discard", None,
                                                       "no scored baseline under protocol v1"),
    "a crash's best is the night protocol's": (BOTH, {"status": "crash", "reason": "x"}, None, False, False, "crash",
                                               20.0, "x"),
}


@pytest.mark.parametrize("name", CASES)
def test_keep_rule(name):
    rows, result, confirm, baseline, strict, status, best, reason = CASES[name]
    decision = keep_rule(rows, result, confirm, baseline=baseline, strict=strict, protocol=FULL)
    assert decision.status == status and decision.confirm == (status == "confirm"), decision
    assert decision.best == pytest.approx(best) if best is not None else decision.best is None, decision
    assert reason in decision.reason, decision


def test_every_scored_decision_names_its_protocol():
    for name, (rows, result, confirm, baseline, strict, *_) in CASES.items():
        decision = keep_rule(rows, result, confirm, baseline=baseline, strict=strict, protocol=FULL)
        if "val_ppl" in result:
            assert f"protocol {result['protocol']}" in decision.reason, name


def test_keep_best_submission_leaves_the_submission_of_an_experiment_in_flight(tmp_path):
    """The test_pool_kill flake: with --workers, a keep decided while another experiment had taken its submission
    and was about to score it deleted that submission; its evaluator found no file and the run became a crash."""
    from types import SimpleNamespace
    runs = tmp_path / "runs"
    for n in range(4):  # 0 baseline, 1 a discard, 2 the keep, 3 in flight: taken, not scored yet (no row)
        (runs / str(n)).mkdir(parents=True)
        (runs / str(n) / "submission.pt").write_bytes(b"x")
    rows = ledger(("a", "baseline", 20.0, FULL), ("b", "discard", 21.0, FULL), ("c", "keep", 18.0, FULL))
    session = SimpleNamespace(runs=runs, rows=lambda: rows, args=SimpleNamespace(eval_windows=None))
    keep_best_submission(session)
    assert sorted(p.parent.name for p in runs.glob("*/submission.pt")) == ["2", "3"]
