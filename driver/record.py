"""A decision written: the ledger rows of an experiment (with the confirmation run's, in one write), its
LLM cost, and the best kept submission kept on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

import prepare
from driver.common import FatalError, log, sha256_file, utc_now
from driver.records import ExperimentState, RunResult
from driver.keep import best_kept, kept_means, night_protocol, same_protocol
from driver.ledger import save_backup
from driver.session import Session

CONFIRMATION = "confirmation run: "  # description prefix of a confirmation run's row


def protect_ledger(session: Session) -> str:
    """The driver's own copy of the ledger lives in .git/: if results.tsv changed since the driver last
    wrote it (train.py truncated, rewrote or deleted it), restore it. Run after every train.py run,
    before anything reads the ledger."""
    current, backup = session.ledger, session.ledger_backup
    prepare.migrate_ledger(backup)  # as a manual run's prepare.py migrates results.tsv: compared in today's format
    if sha256_file(current) == sha256_file(backup):
        return ""
    if manual_rows_added(current, backup):  # someone ran `python train.py` by hand meanwhile: not the experiment
        save_backup(current, backup)
        log("results.tsv: took in the row of a manual `python train.py` run")
        return ""
    if backup.exists():
        shutil.copyfile(backup, current)
    else:  # the driver has written no row yet: whatever is there came from the run
        current.unlink(missing_ok=True)
    log("results.tsv was changed by the experiment: restored the driver's copy")
    return "results.tsv was changed by the experiment and restored from the driver's copy; "


def manual_rows_added(current: Path, backup: Path) -> bool:
    """results.tsv is the driver's copy plus whole rows of status `manual` (they never enter a decision)."""
    if not (current.exists() and backup.exists()):
        return False
    mine, now = backup.read_bytes(), current.read_bytes()
    if not now.startswith(mine) or len(now) == len(mine) or not now.endswith(b"\n"):
        return False
    status = prepare.LEDGER_COLUMNS.index("status")
    rows = [line.split(b"\t") for line in now[len(mine):].splitlines()]
    return all(len(r) == len(prepare.LEDGER_COLUMNS) and r[status] == b"manual" for r in rows)


def append_row(session: Session, row: dict) -> None:
    append_rows(session, [row])


def append_rows(session: Session, rows: list[dict]) -> None:
    """The rows of one decision, in one write (a kill lands before or after all of them)."""
    try:
        note = protect_ledger(session)
        if note:
            rows = [{**row, "reason": note + (row.get("reason") or "")} for row in rows]
        prepare.append_ledger_rows(rows, session.ledger)  # all or nothing: a full disk leaves the file as it was
        save_backup(session.ledger, session.ledger_backup)
    except OSError as exc:
        experiment = rows[0].get("experiment") if rows else None
        raise FatalError(f"could not write experiment {experiment}'s ledger rows: {exc.strerror or exc} "
                         f"({exc.filename or session.ledger}); no row was lost or half written. Free disk space, then "
                         "run the same command again: the decision is made again and its rows written") from None


def append_invalid(session: Session, n: int, parent: str, reason: str, tokens: dict, seen, description: str) -> None:
    """A proposal that never ran: its LLM tokens and cost still reach the ledger."""
    append_row(session, {"experiment": n, "timestamp": utc_now(), "branch": session.branch, "parent": parent,
                         "status": "invalid", "reason": reason, "best_val_ppl": best_kept(session.rows()),
                         "prompt_tokens": tokens["prompt_tokens"], "completion_tokens": tokens["completion_tokens"],
                         "cost_usd": cost_of(session, tokens["prompt_tokens"], tokens["completion_tokens"]),
                         "seen": seen, "description": description})


def cost_of(session: Session, prompt_tokens: int, completion_tokens: int) -> float | None:
    if session.args.proposer == "sweep":
        return 0.0  # no LLM: nothing spent
    if session.args.price_in is None and session.args.price_out is None:
        return None
    return round(((session.args.price_in or 0) * prompt_tokens + (session.args.price_out or 0) * completion_tokens) / 1e6, 6)


def decision_rows(session: Session, st: ExperimentState, result: RunResult, confirm: RunResult | None, status: str,
                  reason: str, best: float | None, prefix: str = "") -> list[dict]:
    """The ledger rows of one decision: the experiment's (its reason after `prefix`, what the driver restored, and
    the experiment it re-applies), and its confirmation run's when there was one."""
    if st.get("reapplied_from") is not None:  # --workers: a stale win made again on the best
        prefix += f"re-application of experiment {st['reapplied_from']}; "
    common = {"experiment": st["experiment"], "branch": session.branch, "commit": st["commit"], "parent": st["parent"],
              "status": status, "best_val_ppl": best, "timestamp": utc_now()}
    fields = ("val_ppl", "train_s", "eval_s", "peak_mem_gb", "train_tokens", "steps", "eval_windows", "protocol",
              "bits_per_weight")
    rows = [{**common, "reason": prefix + (result.get("note") or "") + (result.get("dropped") or "") + reason,
             "prompt_tokens": st.get("prompt_tokens"), "completion_tokens": st.get("completion_tokens"),
             "cost_usd": cost_of(session, st.get("prompt_tokens") or 0, st.get("completion_tokens") or 0),
             "seen": st.get("seen"), "description": st["description"], **{k: result.get(k) for k in fields}}]
    if confirm is not None:
        rows.append({**common, "reason": confirm.get("ledger_note", "") + (confirm.get("note") or "")
                     + (confirm.get("dropped") or "") + (confirm.get("reason") or reason), "description": CONFIRMATION + st["description"],
                     **{k: confirm.get(k) for k in fields}})
    return rows


def recorded_status(rows: pd.DataFrame, st: ExperimentState) -> str | None:
    """The status of the row already written for this experiment's commit (a restart after its decision), or None:
    a decision is written once."""
    mine = rows[(rows["experiment"] == st["experiment"]) & (rows["commit"].fillna("") == st["commit"])]
    return mine.iloc[-1]["status"] if len(mine) else None


def keep_best_submission(session: Session) -> None:
    """Only the best kept commit's submission stays on disk (the report scores it on the test split): the
    first one on disk among that commit's runs, so a repeated baseline keeps the first run's."""
    rows = same_protocol(session.rows(), night_protocol(session.args))
    means = kept_means(rows)
    runs = rows[rows["commit"] == means.idxmin()]["experiment"].dropna().astype(int) if len(means) else []
    best = [session.runs / str(e) / "submission.pt" for e in runs]
    keep = next((path for path in best if path.exists()), None)
    # only decided experiments: with --workers, one in flight may have taken its submission already and be
    # about to score it (deleting it there made its evaluator fail and the run a `crash`)
    decided = {str(e) for e in session.rows()["experiment"].dropna().astype(int)}
    for old in session.runs.glob("*/submission.pt"):
        if old != keep and old.parent.name in decided:
            old.unlink(missing_ok=True)


def checked_ledger(session: Session, result: RunResult) -> RunResult:
    """train.py has run: restore results.tsv before anything reads it; the note goes into the row's reason."""
    note = protect_ledger(session)
    return {**result, "ledger_note": note} if note else result
