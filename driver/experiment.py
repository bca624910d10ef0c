"""One experiment's life on the local slot: propose → commit → train and score → decide → write the rows →
move the branch; the baselines of a new branch; and the resume of an experiment a killed driver left."""

from __future__ import annotations

import json

import git
import pandas as pd

from driver.common import FatalError, atomic_write, atomic_write_bytes, log, one_line, remove_tree, sha256_file
from driver.records import ExperimentState, RunResult
from driver.keep import (BASELINE_TRIES, baseline_complete, baseline_description, baseline_failure, baseline_failures,
                         confirmation_needed, keep_rule, night_protocol, scored_baselines)
from driver.runner import run_process
from driver.scoring import EXIT_GRACE_S, clear_work, remove_run_files, run_outcome, shm_entries, train_command, train_env
from driver.session import Session, stop_reason
from driver.checkout import commit_train_py, discard, restore_tree, save_tree_snapshot, tree_changes
from driver.record import (append_invalid, append_rows, checked_ledger, decision_rows, keep_best_submission,
                           protect_ledger, recorded_status)
from driver.propose import Prefetch, abandon, proposal_for, tokens_since
from driver.sweep import sweep_proposal

def train_and_score(session: Session, st: ExperimentState, label: str = "") -> RunResult:
    """Run train.py, check the trust boundary, score in a fresh process. Returns ledger fields.
    label names a repeat's log files (a confirmation run)."""
    folder = session.runs / str(st["experiment"])
    work = folder / f"work{label}"  # train.py's cwd and only writable folder: the driver's files stay beside it
    submission = folder / "submission.pt"
    submission.unlink(missing_ok=True)
    remove_tree(work)
    work.mkdir(parents=True)
    timeout = session.args.timeout
    before = tree_changes(session)
    save_tree_snapshot(session, before)  # a driver killed during the run restores against it at its restart
    cmd = train_command(session.root, work, session.sandbox_abi, session.train_read)
    shm_before = shm_entries()
    atomic_write(session.shm_snapshot, json.dumps(sorted(shm_before)))  # for a restart after a kill
    try:
        code, train_s = run_process(session, cmd, folder / f"train{label}.log", timeout + EXIT_GRACE_S,
                                    train_env(work, timeout), cwd=work)
        clear_work(session, work)
        return checked_and_scored(session, st, label, code, train_s, before)
    finally:
        remove_run_files(work, shm_before)
        session.shm_snapshot.unlink(missing_ok=True)


def checked_and_scored(session: Session, st: ExperimentState, label: str, code: int | None, train_s: float,
                       before: dict[str, bytes | None]) -> RunResult:
    """After train.py's run: the tree restored, the trust boundary checked, the submission scored."""
    folder, timeout = session.runs / str(st["experiment"]), session.args.timeout
    restored = restore_tree(session, before, st["commit"])  # a train.py that rewrote itself, program.md, ...
    session.tree_snapshot.unlink(missing_ok=True)
    result = {"train_s": round(train_s, 1), "note": session.sandbox_note}
    if restored:
        result["note"] += f"the run changed {', '.join(restored[:5])}: restored; "
        log(f"experiment {st['experiment']}: the run changed {', '.join(restored)}; restored")
    if "prepare.py" in restored or sha256_file(session.root / "prepare.py") != session.prepare_hash:
        session.repo.git.checkout("HEAD", "--", "prepare.py")
        return {**result, "status": "crash", "reason": "prepare.py was modified during the run; restored, not scored"}
    changed = session.repo.git.diff("--name-only", st["parent"], st["commit"]).split()
    if st["kind"] != "baseline" and changed != ["train.py"]:
        return {**result, "status": "invalid", "reason": f"the commit changes {changed}, not only train.py"}
    session.save_state(**{**st, "phase": "scoring"})
    atomic_write(session.model_digests, session.model_expected)  # from memory: a run cannot have edited it
    return {**result, **run_outcome(session, session.root, folder, label, code, timeout, session.model_digests,
                                    session.tokens_expected, session.args.eval_windows, session.args.eval_timeout)}


def finish_experiment(session: Session, st: ExperimentState, result: RunResult,
                      confirm: RunResult | None = None) -> str:
    """Decide (keep_rule), write the decision's rows in one write, then reset if not kept. Idempotent across a kill."""
    n, commit, parent = st["experiment"], st["commit"], st["parent"]
    tampered = protect_ledger(session) + result.get("ledger_note", "")  # before the decision reads it
    rows = session.rows()
    status = recorded_status(rows, st)
    if status is None:
        decision = keep_rule(rows, result, confirm, baseline=st["kind"] == "baseline", strict=session.args.strict,
                             protocol=night_protocol(session.args))
        status = decision.status
        # the results, saved: a driver stopped before the rows are on disk (a full disk) writes them at its restart
        session.save_state(**{**st, "phase": "deciding", "result": result, "confirm": confirm})
        append_rows(session, decision_rows(session, st, result, confirm, status, decision.reason, decision.best, tampered))
    session.save_state(**{**st, "phase": "recorded"})
    if status not in ("keep", "baseline") and st["kind"] != "baseline":
        discard(session, n, commit, parent, st)
    keep_best_submission(session)
    session.save_state(**{**st, "phase": "done"})
    return status


def guarded_run(session: Session, st: ExperimentState, label: str = "") -> RunResult:
    """train_and_score, where anything unexpected in what the run left behind (an unreadable file, a tree
    too deep) is a crash row naming it, not a driver that dies on it again at every restart."""
    try:
        return train_and_score(session, st, label)
    except (git.GitCommandError, FatalError):
        raise
    except Exception as exc:
        log(f"experiment {st['experiment']}: the run could not be handled: {type(exc).__name__}: {exc}")
        return {"status": "crash", "reason": f"the driver could not handle what the run left: {type(exc).__name__}: "
                                             f"{one_line(exc, 150)}"}


def run_committed(session: Session, st: ExperimentState) -> str:
    if "first" in st:  # resumed while confirming: the first run's result is already known
        result = st["first"]
    else:
        session.save_state(**{**st, "phase": "training"})
        log(f"experiment {st['experiment']}: training ({st['description']})")
        result = checked_ledger(session, guarded_run(session, st))
    confirm = None
    if confirmation_needed(session.rows(), result, baseline=st["kind"] == "baseline", strict=session.args.strict,
                           protocol=night_protocol(session.args)):
        st = {**st, "first": result}
        session.save_state(**{**st, "phase": "confirming"})
        log(f"experiment {st['experiment']}: val_ppl {result['val_ppl']:.4g} is a marginal gain; confirming")
        confirm = checked_ledger(session, guarded_run(session, st, label="-confirm"))
    status = finish_experiment(session, st, result, confirm)
    log(f"experiment {st['experiment']}: {status}  val_ppl={result.get('val_ppl')}  {result.get('reason', '')}")
    return status


def next_experiment(session: Session) -> int:
    """Numbers continue from the ledger; one killed before its row was written is reused, but not one a killed
    --workers night left in flight: its next --workers start runs those under their numbers (Pool.resume), even
    after a start on one GPU in between."""
    rows = session.rows()
    taken = numbers_in_flight(session, rows) + ([int(rows["experiment"].max())] if len(rows) else [])
    return max(taken) + 1 if taken else 0


def numbers_in_flight(session: Session, rows: pd.DataFrame) -> list[int]:
    """The numbers inflight/<n>.json hold for Pool.resume: each experiment's, and the rerun or re-apply that its
    written row announces (one not yet announced is given up by Pool.resume: free)."""
    numbers = []
    for path in session.inflight_dir.glob("*.json"):
        try:
            st = json.loads(path.read_text())
            numbers.append(int(st["experiment"]))
        except (OSError, ValueError, KeyError, TypeError):  # unreadable: Pool.resume sets it aside
            continue
        if "commit" in st and recorded_status(rows, st) is not None:
            numbers += [int(st[key]) for key in ("rerun_as", "reapply_as") if st.get(key) is not None]
    return numbers


def run_baselines(session: Session) -> None:
    """Before any experiment is compared under this start's protocol, score train.py as it is
    (--baseline-runs times: the spread of the repeats is the run-to-run noise): the reference every change
    must beat. A run that does not score is run again; BASELINE_TRIES failures in a row stop the night."""
    protocol, failures = night_protocol(session.args), 0
    while not stop_reason(session):
        rows = session.rows()
        if baseline_complete(rows, protocol, session.args.baseline_runs):
            return  # enough runs, or this protocol's experiments have begun
        if failures >= BASELINE_TRIES:
            raise FatalError(baseline_failure(rows, protocol, session.args.tag))
        head = session.repo.head.commit.hexsha
        description = baseline_description(rows, protocol, scored_baselines(rows, protocol) + 1)
        status = run_committed(session, {"experiment": next_experiment(session), "kind": "baseline", "commit": head,
                                         "parent": head, "description": description})
        failures = baseline_failures(failures, session.rows().iloc[-1] if status == "baseline" else None, protocol)


def run_one(session: Session, pending: Prefetch | None = None, prefetch: bool = False) -> tuple[str, Prefetch | None]:
    """One experiment; with prefetch, the next proposal is asked for while this one trains."""
    repo, n = session.repo, next_experiment(session)
    parent = repo.head.commit.hexsha
    old = (session.root / "train.py").read_bytes().decode("utf-8")  # as committed: read_text() turns \r into \n
    session.save_state(experiment=n, kind="proposal", phase="llm")
    spent: list[tuple[int, int]] = []
    try:
        if session.args.proposer == "sweep":
            proposal = sweep_proposal(session, n, old)
        else:
            proposal = proposal_for(session, n, old, pending, spent)
    except BaseException as exc:  # a stop or a refusal while asking: the calls already answered are still billed
        if spent:
            append_invalid(session, n, parent, f"not run: the driver stopped while asking the LLM ({one_line(exc, 150) or type(exc).__name__})",
                           tokens_since(spent), None, "(abandoned)")
            session.save_state(experiment=n, kind="proposal", phase="done")
        raise
    seen = proposal["seen"]
    if "error" in proposal:
        append_invalid(session, n, parent, proposal["error"], proposal, seen, proposal.get("description") or "(reply rejected)")
        session.save_state(experiment=n, kind="proposal", phase="done")
        log(f"experiment {n}: invalid  {one_line(proposal['error'], 150)}")
        return "invalid", None
    atomic_write(session.runs / str(n) / "proposed_train.py", proposal["train_py"])
    st = {"experiment": n, "kind": "proposal", "parent": parent, "description": proposal["description"], "seen": seen,
          "prompt_tokens": proposal["prompt_tokens"], "completion_tokens": proposal["completion_tokens"]}
    st = apply_and_commit(session, st)
    following = Prefetch(session, n + 1, old, in_flight=st["description"]) if prefetch else None
    try:
        return run_committed(session, st), following
    except BaseException:
        if following is not None:
            abandon(session, following, f"the driver stopped while experiment {n} ran")
        raise


def apply_and_commit(session: Session, st: ExperimentState) -> ExperimentState:
    """Write the proposed train.py and commit it; safe to repeat after a kill at any point."""
    repo, parent = session.repo, st["parent"]
    session.save_state(**st, phase="applying")
    head = repo.head.commit
    if head.hexsha != parent and head.parents and head.parents[0].hexsha == parent:
        commit = head.hexsha  # committed just before the driver was stopped
    else:
        proposed = session.runs / str(st["experiment"]) / "proposed_train.py"
        atomic_write_bytes(session.root / "train.py", proposed.read_bytes())  # as is: a reply's \r stays a \r
        # the trailer makes each experiment's commit unique (an identical change proposed twice in the
        # same second would otherwise give the same hash), so the ledger's commit column is a key
        commit = commit_train_py(session, f"{st['description']}\n\nautoresearch experiment {st['experiment']}")
    st = {**st, "commit": commit}
    atomic_write(session.runs / str(st["experiment"]) / "diff.patch", repo.git.diff(parent, commit) + "\n")
    session.save_state(**st, phase="committed")
    return st


def resume(session: Session) -> int:
    """A committed experiment that was never scored is run again; a recorded one is finished.
    Returns how many experiments it ran (they count towards --max-experiments)."""
    st = {k: v for k, v in session.state().items() if k != "phase"}
    phase = session.state().get("phase")
    counted = int(st.get("kind") != "baseline")
    if phase == "applying" and (session.runs / str(st["experiment"]) / "proposed_train.py").exists():
        log(f"resuming experiment {st['experiment']}: applying its saved proposal")
        run_committed(session, apply_and_commit(session, st))
        return counted
    elif phase in ("committed", "training", "scoring", "confirming") and st.get("commit"):
        head = session.repo.head.commit.hexsha
        if head != st["commit"]:
            log(f"state names commit {st['commit'][:8]} but HEAD is {head[:8]}: not resuming it")
            return 0
        log(f"resuming experiment {st['experiment']}: committed but never scored, running it again")
        run_committed(session, st)
        return counted
    elif phase in ("recorded", "discarding"):  # the row is written; the reset may not be
        finish_experiment(session, st, {})
        return counted
    elif phase == "deciding":  # scored; its rows may not be written yet
        log(f"resuming experiment {st['experiment']}: writing its decision")
        finish_experiment(session, {k: v for k, v in st.items() if k not in ("result", "confirm")}, st["result"],
                          st["confirm"])
        return counted
    return 0
