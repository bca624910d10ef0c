"""The decision's siblings of keep.keep_rule (confirmation needed, stale parent, baseline complete, the baseline's
wording), as tables; and pool.Pool deciding with them, without Ray: a scripted stand-in for the few calls of Ray the
pool makes (a task's result is a score read from the experiment's own train.py, or a lost worker), everything else
real (the session, the branch, worktrees, commits, refs, state files, the ledger)."""
import re
from pathlib import Path

import git
import pytest

import agent
from driver.common import FatalError
from driver.keep import (BASELINE_TRIES, baseline_complete, baseline_description, baseline_failure, baseline_failures,
                         confirmation_needed, keep_rule, night_protocol, stale_parent)
from driver.session import Session, budget_left, open_session
from driver.checkout import setup_branch
from conftest import REQUIRE_ASSETS
from driver_helpers import TAG, ledger
from test_keep_rule import FULL, NOISY, ONE, SMOKE, scored
from test_keep_rule import ledger as rows_of  # driver_helpers' ledger reads a repository's results.tsv

# the KD_WEIGHT night: a (308) is the parent of the slow experiment; b (126), kept meanwhile, is the best
MOVED = rows_of(("a", "baseline", 309.0, FULL), ("a", "baseline", 307.0, FULL), ("b", "keep", 126.0, FULL))
MOVED_NOISY = rows_of(("a", "baseline", 20.5, FULL), ("a", "baseline", 19.5, FULL), ("b", "keep", 15.0, FULL))


# ---------------------------------------------------------------- the confirmation trigger
CONFIRM_CASES = {
    # name: (rows, result, baseline, strict, → a confirmation run)
    "marginal gain": (NOISY, scored(19.0), False, False, True),
    "clear gain": (NOISY, scored(15.0), False, False, False),
    "worse": (NOISY, scored(21.0), False, False, False),
    "strict: never": (NOISY, scored(19.0), False, True, False),
    "no noise estimate: never": (ONE, scored(19.9), False, False, False),
    "a baseline: never": (NOISY, scored(19.0), True, False, False),
    "a crash: never": (NOISY, {"status": "crash", "reason": "x"}, False, False, False),
    "no score at all: never": (NOISY, {}, False, False, False),
    "smoke scores are not compared with full ones": (NOISY, scored(19.0, SMOKE), False, False, False),
}


@pytest.mark.parametrize("name", CONFIRM_CASES)
def test_confirmation_needed(name):
    rows, result, baseline, strict, expected = CONFIRM_CASES[name]
    assert confirmation_needed(rows, result, baseline=baseline, strict=strict, protocol=FULL) is expected


# ---------------------------------------------------------------- is the baseline done
BASELINE_CASES = {
    # name: (rows, protocol, --baseline-runs, → done)
    "none yet": (rows_of(), FULL, 2, False),
    "one of two": (ONE, FULL, 2, False),
    "two of two": (NOISY, FULL, 2, True),
    "one of one": (ONE, FULL, 1, True),
    "failed runs do not count": (rows_of(("a", "crash", None, None), ("a", "baseline", 20.0, FULL)), FULL, 2, False),
    "experiments have begun: done": (rows_of(("a", "baseline", 20.0, FULL), ("b", "keep", 19.0, FULL)), FULL, 2, True),
    "another protocol's runs do not count": (NOISY, SMOKE, 1, False),
    "another protocol's keep does not count": (rows_of(("a", "baseline", 20.0, SMOKE), ("b", "keep", 9.0, SMOKE)), FULL, 1,
                                               False),
}


@pytest.mark.parametrize("name", BASELINE_CASES)
def test_baseline_complete(name):
    rows, protocol, runs, expected = BASELINE_CASES[name]
    assert baseline_complete(rows, protocol, runs) is expected


DESCRIPTION_CASES = {
    # name: (rows, protocol, run, → description)
    "the first run": (rows_of(), FULL, 1, "baseline: unmodified train.py"),
    "a repeat": (ONE, FULL, 2, "baseline: unmodified train.py (run 2)"),
    "the kept train.py under a new protocol": (rows_of(("a", "baseline", 20.0, FULL), ("b", "keep", 19.0, FULL)), SMOKE, 1,
                                               f"baseline: train.py as kept, under {SMOKE}"),
    "its repeat": (rows_of(("a", "baseline", 20.0, FULL), ("b", "keep", 19.0, FULL)), SMOKE, 3,
                   f"baseline: train.py as kept, under {SMOKE} (run 3)"),
}


@pytest.mark.parametrize("name", DESCRIPTION_CASES)
def test_baseline_description(name):
    rows, protocol, run, expected = DESCRIPTION_CASES[name]
    assert baseline_description(rows, protocol, run) == expected


def test_baseline_failure_names_the_last_runs_reason_and_folder():
    rows = rows_of(("a", "crash", None, None), ("a", "timeout", None, None), ("a", "crash", None, None))
    rows["reason"] = ["boom", "ran past", "train.py exited with 1:\nTraceback"]
    message = baseline_failure(rows, FULL, TAG)
    assert message == (f"train.py as committed did not score under protocol {FULL} in {BASELINE_TRIES} tries "
                       f"(last: train.py exited with 1: Traceback); see runs/{TAG}/2/: fix train.py (or the harness) "
                       "and start again")
    other = rows_of(("a", "baseline", 20.0, SMOKE))  # scored, but not under the night's protocol
    assert f"(last: scored under protocol {SMOKE})" in baseline_failure(other, FULL, TAG)


FAILURE_CASES = {
    # name: (failures so far, the run's row, → failures in a row)
    "scored: the count starts again": (2, ("a", "baseline", 20.0, FULL), 0),
    "a crash": (1, ("a", "crash", None, None), 2),
    "no row at all": (2, None, 3),
    "scored under another protocol": (0, ("a", "baseline", 20.0, SMOKE), 1),
}


@pytest.mark.parametrize("name", FAILURE_CASES)
def test_baseline_failures_are_counted_in_a_row(name):
    failures, row, expected = FAILURE_CASES[name]
    assert baseline_failures(failures, rows_of(row).iloc[0] if row else None, FULL) == expected


# ---------------------------------------------------------------- a result measured on a stale parent
STALE_CASES = {
    # name: (rows, result, confirm, parent, head, strict, → status, re-applied, reason contains)
    "on the best: decided as keep_rule decided": (MOVED, scored(100.0), None, "b", "b", False, "keep", False,
                                                  "val_ppl improved"),
    "beat the best on a stale parent": (MOVED, scored(100.0), None, "a", "b", False, "discard", True,
                                        "stale parent: val_ppl improved"),
    "beat its own parent, not the best (KD_WEIGHT 1.0 -> 0.0)": (MOVED, scored(260.0), None, "a", "b", False, "discard",
                                                                 True, "it beat that parent's 308"),
    "worse than its own parent": (MOVED, scored(320.0), None, "a", "b", False, "discard", False, "not lower"),
    "equal to its own parent": (MOVED_NOISY, scored(20.0), None, "a", "b", False, "discard", False, "not lower"),
    "a gain on its own parent within the noise": (MOVED_NOISY, scored(19.0), None, "a", "b", False, "discard", False,
                                                  "not lower"),
    "a gain on its own parent beyond the noise": (MOVED_NOISY, scored(18.0), None, "a", "b", False, "discard", True,
                                                  "it beat that parent's 20"),
    "strict: any gain on its own parent": (MOVED_NOISY, scored(19.9), None, "a", "b", True, "discard", True,
                                           "it beat that parent's 20"),
    "confirmed: the mean of both runs": (MOVED_NOISY, scored(19.0), scored(19.4), "a", "b", False, "discard", True,
                                         "19.2"),
    "confirmed, and not lower": (MOVED_NOISY, scored(19.0), scored(21.4), "a", "b", False, "discard", False, "20.2"),
    "a crash stays a crash": (MOVED, {"status": "crash", "reason": "oom"}, None, "a", "b", False, "crash", False, "oom"),
    "a parent with no score under this protocol": (MOVED, scored(260.0), None, "z", "b", False, "discard", False,
                                                   "not lower"),
}


@pytest.mark.parametrize("name", STALE_CASES)
def test_stale_parent(name):
    rows, result, confirm, parent, head, strict, status, reapply, says = STALE_CASES[name]
    decision = keep_rule(rows, result, confirm, strict=strict, protocol=FULL)
    verdict = stale_parent(rows, result, decision, parent, head, confirm, strict=strict, protocol=FULL)
    assert (verdict.status, verdict.reapply) == (status, reapply), verdict
    assert says in verdict.reason, verdict
    assert verdict.best == decision.best
    if reapply:  # what it was measured on, and why it was not kept there
        assert verdict.reason.startswith(f"stale parent: {decision.reason}, but measured on {parent}, which is no "
                                         f"longer the best ({head})"), verdict
    else:
        assert verdict == decision


# ---------------------------------------------------------------- pool.Pool, its runs scripted (no Ray)
P_TOKENS, C_TOKENS = 1200, 300
PRICE_IN, PRICE_OUT = 2.5, 10.0
COST = round((PRICE_IN * P_TOKENS + PRICE_OUT * C_TOKENS) / 1e6, 6)


def constant(text: str, name: str) -> float:
    return float(re.search(rf"^{name} = ([0-9.]+)", text, re.M).group(1))


class ScriptedTask:
    def __init__(self, ray: "ScriptedRay"):
        self.ray = ray

    def remote(self, spec: dict) -> int:
        self.ray.specs.append(spec)
        return len(self.ray.specs) - 1


class ScriptedRay:
    """What pool.Pool calls of Ray. A task's result is the stand-in train.py's score, PPL * PPL_SCALE read from the
    experiment's own worktree (plus `jitter[n]`), under the night's protocol; `outcome[n]` replaces it (a crash's
    fields, or a Ray exception: the worker was lost)."""

    def __init__(self, session: Session):
        import ray
        self.exceptions = ray.exceptions
        self.session, self.specs, self.jitter, self.outcome = session, [], {}, {}

    def remote(self, **options):
        return lambda fn: ScriptedTask(self)

    def get(self, ref: int) -> dict:
        spec = self.specs[ref]
        n = spec["experiment"]
        if n in self.outcome:
            if isinstance(self.outcome[n], Exception):
                raise self.outcome[n]
            return dict(self.outcome[n])
        text = (Path(spec["tree"]) / "train.py").read_text()
        return {"val_ppl": constant(text, "PPL") * constant(text, "PPL_SCALE") + self.jitter.get(n, 0.0),
                "protocol": night_protocol(self.session.args), "note": "worker gpu0; "}

    def wait(self, refs: list, num_returns: int = 1, timeout=None) -> tuple[list, list]:
        return refs[:num_returns], refs[num_returns:]


@pytest.fixture
def night(repo):
    """A --workers 2 night on `repo` (branch set up as night.run_loop does), with a ScriptedRay."""
    if not REQUIRE_ASSETS:  # CI installs Ray: there a missing Ray fails
        pytest.importorskip("ray", reason="Ray is not installed: pip install -r requirements-cluster.txt")
    from driver import pool
    args = agent.parse_args(["--repo", str(repo), "--tag", TAG, "--workers", "2", "--baseline-runs", "2",
                             "--price-in", str(PRICE_IN), "--price-out", str(PRICE_OUT)])
    session = open_session(args)
    setup_branch(session)
    return pool.Pool(session, ScriptedRay(session), 2)


def propose(night, text: str, description: str) -> dict:
    """A proposal on the best as it is now, committed and in flight (as Pool.propose_and_run leaves it)."""
    n, head = night.allocate(), night.head()
    st = {"experiment": n, "kind": "proposal", "parent": head, "seen": None, "description": description,
          "prompt_tokens": P_TOKENS, "completion_tokens": C_TOKENS}
    st["commit"] = night.commit_change(n, head, text, description)
    night.submit(st)
    return st


def collect(night, n: int) -> None:
    night.collect(next(ref for ref, st in night.flights.items() if st["experiment"] == n))


def row(repo: Path, n: int) -> dict:
    rows = ledger(repo)
    mine = rows[rows["experiment"] == n]
    assert len(mine) == 1, rows[["experiment", "status", "description", "reason"]]
    return mine.iloc[0].to_dict()


def test_a_lost_workers_crash_row_carries_the_cost_of_its_proposal(repo, night):
    night.ray.jitter = {0: 0.5, 1: -0.5}
    night.baselines()
    train_py = (repo / "train.py").read_text()
    st = propose(night, train_py.replace("PPL = 20.0", "PPL = 16.0"), "lower")
    night.ray.outcome[st["experiment"]] = night.ray.exceptions.WorkerCrashedError()
    collect(night, st["experiment"])
    crash = row(repo, st["experiment"])
    assert crash["status"] == "crash" and "lost" in crash["reason"] and "runs again as experiment" in crash["reason"]
    assert crash["prompt_tokens"] == P_TOKENS and crash["completion_tokens"] == C_TOKENS
    assert crash["cost_usd"] == pytest.approx(COST), crash
    m = int(crash["reason"].rsplit("runs again as experiment ", 1)[1])
    collect(night, m)
    rerun = row(repo, m)
    assert rerun["status"] == "keep" and rerun["val_ppl"] == pytest.approx(16.0)
    # what --max-cost counts: the proposal's tokens, once (its rerun asked the LLM nothing)
    assert ledger(repo)["cost_usd"].fillna(0).sum() == pytest.approx(COST)
    assert budget_left(night.session, 0) == ""
    night.args.max_cost = COST
    assert budget_left(night.session, 0) == f"--max-cost {COST} reached"


def test_the_pools_baselines_are_worded_as_the_one_gpu_nights(repo, night):
    night.ray.jitter = {0: 0.5, 1: -0.5}
    night.baselines()
    train_py = (repo / "train.py").read_text()
    st = propose(night, train_py.replace("PPL = 20.0", "PPL = 16.0"), "lower")
    collect(night, st["experiment"])
    assert row(repo, st["experiment"])["status"] == "keep"
    night.args.eval_windows = 2  # a new start under a smoke protocol: its own baselines, of the kept train.py
    protocol = night_protocol(night.args)
    night.baselines()
    rows = ledger(repo)
    assert rows[rows["status"] == "baseline"]["description"].tolist() == [
        "baseline: unmodified train.py", "baseline: unmodified train.py (run 2)",
        f"baseline: train.py as kept, under {protocol}", f"baseline: train.py as kept, under {protocol} (run 2)"]


def test_the_pools_baseline_failure_names_the_last_runs_reason(repo, night):
    night.ray.outcome = {n: {"status": "crash", "reason": f"train.py exited with 1: scripted failure {n}"}
                         for n in range(2 * BASELINE_TRIES)}
    with pytest.raises(FatalError) as stop:
        night.baselines()
    last = int(ledger(repo)["experiment"].iloc[-1])
    assert str(stop.value) == (f"train.py as committed did not score under protocol {FULL} in {BASELINE_TRIES} "
                               f"tries (last: train.py exited with 1: scripted failure {last}); see "
                               f"runs/{TAG}/{last}/: fix train.py (or the harness) and start again")


def test_the_pools_baseline_failures_are_counted_in_a_row_as_the_one_gpu_nights(repo, night):
    """Crash, score, crash, crash, score: never BASELINE_TRIES in a row, so the night goes on (the pool counted 3 in
    all and stopped, where the one-GPU night went on)."""
    night.ray.outcome = {n: {"status": "crash", "reason": f"scripted failure {n}"} for n in (0, 2, 3)}
    night.baselines()
    rows = ledger(repo)
    assert rows["status"].tolist() == ["crash", "baseline", "crash", "crash", "baseline"], rows


@pytest.mark.parametrize("slow_ppl, reapplied", [(16.0, True), (19.0, False)])
def test_a_result_on_a_stale_parent_is_judged_against_its_own_parent(repo, night, slow_ppl, reapplied):
    """Two proposals on the baseline (mean 20, 2σ 1.41). The quick one (PPL_SCALE 0.5: 10) is kept first; the slow one
    (PPL 20 -> slow_ppl) ends on a parent that is no longer the best. 16 beats its own parent beyond the noise, not the
    best: re-applied on the best, where both changes score 8 and are kept. 19 is within the noise: discarded."""
    night.ray.jitter = {0: 0.5, 1: -0.5}
    night.baselines()
    baseline = night.head()
    train_py = (repo / "train.py").read_text()
    slow = propose(night, train_py.replace("PPL = 20.0", f"PPL = {slow_ppl}"), "slow: lower PPL")
    quick = propose(night, train_py.replace("PPL_SCALE = 1.0", "PPL_SCALE = 0.5"), "quick: halve the scale")
    collect(night, quick["experiment"])
    assert row(repo, quick["experiment"])["status"] == "keep" and night.head() == quick["commit"]
    collect(night, slow["experiment"])
    measured = row(repo, slow["experiment"])
    assert measured["status"] == "discard" and measured["val_ppl"] == pytest.approx(slow_ppl)
    assert measured["parent"] == baseline
    if not reapplied:
        assert "stale parent" not in measured["reason"] and not night.flights, measured
        assert night.head() == quick["commit"]
        return
    assert "stale parent" in measured["reason"], measured
    m = int(measured["reason"].split("re-applied on it as experiment ")[1])
    (again,) = night.flights.values()
    assert again["experiment"] == m and again["parent"] == quick["commit"]
    collect(night, m)
    redo = row(repo, m)
    assert redo["status"] == "keep" and redo["val_ppl"] == pytest.approx(8.0), redo
    assert redo["parent"] == quick["commit"] and f"re-application of experiment {slow['experiment']}" in redo["reason"]
    assert redo["description"] == f"re-applied on {quick['commit'][:8]}: slow: lower PPL"
    assert night.head() == redo["commit"] and git.Repo(repo).commit(redo["commit"]).parents[0].hexsha == quick["commit"]
    text = (repo / "train.py").read_text()
    assert f"PPL = {slow_ppl}" in text and "PPL_SCALE = 0.5" in text
