"""results.tsv, the ledger: read it, repair a half-written last line, reconcile it with the driver's own copy.

The format (columns, one-line cells, the all-or-nothing append) is prepare.py's: a manual `python train.py`
writes the same rows. This file reads; record.py writes a decision's rows."""

from __future__ import annotations

import csv
import math
import os
import shutil
from datetime import datetime
from pathlib import Path

import git
import pandas as pd

import prepare
from driver.common import FatalError, atomic_write_bytes, one_line, temp_path

LEDGER_TAIL_ROWS = 30          # rows of history shown to the LLM, besides every keep
LEDGER_WINDOW_STEP = 10        # those rows' window moves this many at a time: in between, a new row only adds to
                               # the prompt's end, and a server's prefix cache reuses the rows shown before
REQUIRED_COLUMNS = {"experiment", "branch", "commit", "status", "val_ppl"}

# the last parse of each ledger, by its exact bytes: the driver reads the ledger some ten times an experiment, and
# parsing it was a third of the driver's time (bench/driver_overhead.py); any change to the bytes parses it again
_PARSED: dict[Path, tuple[bytes, pd.DataFrame]] = {}


def parse_ledger(data: bytes) -> tuple[list[str], list[list[str]], list[tuple[int, str, str]]]:
    """(header, the rows' cells, the malformed lines as (line number, line, why)). A line is malformed when its
    quoting is broken or its number of fields is not the header's; blank lines are no rows (a row of empty
    cells is one)."""
    lines = data.decode("utf-8", errors="replace").split("\n")
    header = lines[0].rstrip("\r").split("\t")
    records, bad = [], []
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip() and "\t" not in line:
            continue
        try:
            cells = next(csv.reader([line], delimiter="\t", strict=True))
        except csv.Error as exc:
            bad.append((number, line, f"broken quoting: {exc}"))
            continue
        if len(cells) != len(header):
            bad.append((number, line, f"{len(cells)} fields where the header has {len(header)}"))
        else:
            records.append(cells)
    return header, records, bad


def malformed_message(path: Path, bad: list[tuple[int, str, str]]) -> str:
    number, line, why = bad[0]
    more = f" (and {len(bad) - 1} more malformed lines)" if len(bad) > 1 else ""
    return f"{path} line {number} is malformed ({why}): {one_line(line, 60)!r}{more}"


def read_ledger(path: Path) -> pd.DataFrame:
    """The ledger, every row of it: a malformed line (a row cut or split by an editor, a power cut) stops the
    caller with a FatalError naming it, never a row left out. reconcile_ledger repairs what the driver's copy
    can repair before anything reads the ledger."""
    data = path.read_bytes() if path.exists() else b""
    if not data:
        return pd.DataFrame(columns=prepare.LEDGER_COLUMNS)
    last = _PARSED.get(path)
    if last is not None and last[0] == data:
        return last[1].copy()  # a copy: callers may change theirs
    header, records, bad = parse_ledger(data)
    if not REQUIRED_COLUMNS <= set(header):
        raise FatalError(f"{path} is not a ledger (its first line is {one_line(chr(9).join(header), 80)!r}): restore "
                         "it from a copy, or move it aside to start a new one")
    if bad:
        raise FatalError(f"{malformed_message(path, bad)}: join or delete the line (the driver's copy of the rows it "
                         f"wrote is {ledger_backup_of(path.parent)}), then run the command again")
    rows = pd.DataFrame(records, columns=header)
    rows = rows.where(rows != "")
    for column in prepare.LEDGER_NUMBERS & set(header):  # non-numbers (an edit by hand) and inf read as empty
        values = pd.to_numeric(rows[column], errors="coerce")
        rows[column] = values.where(values.abs() != math.inf)
    rows = rows.reindex(columns=list(dict.fromkeys(prepare.LEDGER_COLUMNS + header)))
    _PARSED[path] = (data, rows)
    return rows.copy()


def branch_ledger(path: Path, branch: str) -> pd.DataFrame:
    """The branch's experiments (manual `python train.py` rows are not part of the research)."""
    rows = read_ledger(path)
    return rows[(rows["branch"] == branch) & (rows["status"] != "manual")]


def repair_last_line(path: Path) -> str:
    """A last line without its newline: a whole row (a spreadsheet's save) gets the newline back; a row cut
    short by a kill mid-write is dropped (its decision is made again on resume). Returns what was done."""
    data = path.read_bytes() if path.exists() else b""
    if not data or data.endswith(b"\n"):
        return ""
    head, _, last = data.rpartition(b"\n")
    if last.count(b"\t") == data.split(b"\n", 1)[0].count(b"\t") and head:
        atomic_write_bytes(path, data + b"\n")
        return "results.tsv: added the missing newline after its last row"
    atomic_write_bytes(path, head + b"\n" if head else b"")
    cut = one_line(last.decode(errors="replace"), 100)
    return f"results.tsv: dropped a last row cut short (a kill mid-write?): {cut!r}"


def reconcile_ledger(ledger: Path, backup: Path) -> list[str]:
    """At start: results.tsv must hold every row the driver wrote (its copy in .git/, `backup`). Rows added
    since (manual runs, other tags) are taken into the copy; a results.tsv that lost rows (deleted,
    overwritten, a row broken by an edit) is set aside and restored from the copy, never copied over it. A
    malformed line the copy cannot restore stops here, named (FatalError). Returns log lines."""
    notes = [note for note in (repair_last_line(ledger), repair_last_line(backup)) if note]
    notes += [f"{path.name}: added the column bits_per_weight (a ledger of an earlier version)"
              for path in (ledger, backup) if prepare.migrate_ledger(path)]
    if not ledger.exists() or ledger.stat().st_size == 0:
        if backup.exists() and backup.stat().st_size:
            shutil.copyfile(backup, ledger)
            notes.append(f"results.tsv was missing or empty: restored its {len(backup.read_bytes().splitlines()) - 1} "
                         f"rows from the driver's copy {backup} (a fresh start wants a new --tag)")
        return notes
    bad = parse_ledger(ledger.read_bytes())[2]
    copy_bad = parse_ledger(backup.read_bytes())[2] if backup.exists() else []
    mine = set(backup.read_bytes().splitlines()) if backup.exists() and not copy_bad else set()
    if mine <= set(ledger.read_bytes().replace(b"\r\n", b"\n").splitlines()):
        if bad:  # every row of the driver's copy is there: the malformed line is no row the driver wrote
            raise FatalError(f"{malformed_message(ledger, bad)}, and the driver's copy {backup} has no row to restore it "
                             "from: join or delete the line, then run the same command again")
        if copy_bad:
            notes.append(f"the driver's copy was malformed ({malformed_message(backup, copy_bad)}): replaced by "
                         "results.tsv")
        save_backup(ledger, backup)
        return notes
    aside = ledger.with_name(f"results.tsv.lost-rows-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    os.replace(ledger, aside)
    shutil.copyfile(backup, ledger)
    broken = f" ({malformed_message(aside, bad)})" if bad else ""
    return notes + [f"results.tsv had lost rows the driver wrote{broken}: restored from {backup}; the file as found "
                    f"is {aside}"]


def save_backup(ledger: Path, backup: Path) -> None:
    """The driver's copy, replaced in one step: a kill mid-copy never leaves a truncated copy, a full disk no
    temp file."""
    backup.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(backup)
    try:
        shutil.copyfile(ledger, tmp)
        os.replace(tmp, backup)
    finally:
        tmp.unlink(missing_ok=True)


def ledger_for_prompt(rows: pd.DataFrame, tail: int = LEDGER_TAIL_ROWS) -> str:
    """Every keep and the last `tail` rows (up to LEDGER_WINDOW_STEP - 1 more, so that the window starts on a
    multiple of the step); a prompt shrunk to fit the context shows only the last keeps and `tail` rows."""
    if rows.empty:
        return "(no experiments yet)"
    cols = ["experiment", "status", "val_ppl", "description", "reason"]
    if rows["protocol"].dropna().nunique() > 1:  # scores of different protocols do not compare: say which is which
        cols.insert(3, "protocol")
    keeps = rows[rows["status"] == "keep"]
    if tail >= LEDGER_TAIL_ROWS:
        recent = rows.iloc[max(0, len(rows) - tail) // LEDGER_WINDOW_STEP * LEDGER_WINDOW_STEP:]
    else:
        keeps, recent = keeps.tail(tail), rows.tail(tail)
    shown = pd.concat([keeps, recent]).drop_duplicates()
    shown = shown.sort_values("experiment")[cols].copy()
    shown["reason"] = shown["reason"].fillna("").map(lambda r: one_line(r, 120))
    counts = rows["status"].value_counts().to_dict()
    return shown.to_csv(sep="\t", index=False) + f"\n(of {len(rows)} rows: {counts})"


def ledger_backup_of(root: Path) -> Path:
    """The driver's copy of results.tsv (Session.ledger_backup), out of train.py's reach in .git/."""
    try:
        return Path(git.Repo(root).git_dir) / "autoresearch" / "results.tsv"
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return root / ".git" / "autoresearch" / "results.tsv"
