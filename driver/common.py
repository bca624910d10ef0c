"""What every part of the driver shares: its errors, its log line, atomic writes and a few small helpers."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import prepare

# every git command of the driver: no hook and no fsmonitor command can run in the driver's environment
GIT_SAFE_CONFIG = ["core.hooksPath=/dev/null", "core.fsmonitor=false"]
TEMP_NAME = re.compile(r"\..+\.tmp\d+")  # an atomic write's temp file: .NAME.tmpPID, renamed to NAME when whole


class ReplyError(Exception):
    """The reply cannot be applied; the message is sent back to the LLM as a repair request."""


class FatalError(Exception):
    """Stop the driver: the user must fix something (the message says what)."""


class StopNight(Exception):
    """Stop the driver cleanly (a budget ran out or a stop was asked for while waiting on the LLM)."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def temp_path(path: Path) -> Path:
    """Where a write to `path` is made whole before its rename: TEMP_NAME, so a start finds what a kill left."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8", errors="replace"))  # an LLM's reply may hold a lone surrogate


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open_new(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
    finally:  # a full disk: no temp file left behind
        tmp.unlink(missing_ok=True)


def remove_temp_files(folder: Path, pattern: str) -> list[Path]:
    """The temp files atomic_write_bytes and its kin left in `folder` (a driver killed between a temp file's
    creation and its rename), found by the glob `pattern`: called at start, when no process of this night can be
    writing one."""
    found = [p for p in folder.glob(pattern) if TEMP_NAME.fullmatch(p.name) and p.is_file()]
    for path in found:
        path.unlink(missing_ok=True)
    return found


def open_new(path: Path):
    """A fresh file for writing, never through a link someone left at `path` (a run folder is not ours alone
    when train.py runs unsandboxed)."""
    path.unlink(missing_ok=True)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb")


def remove_tree(path: Path) -> None:
    """rm -rf without recursion in Python: a run may leave a tree deeper than the recursion limit."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        subprocess.run(["rm", "-rf", "--", str(path)], check=False)


def one_line(text: str, limit: int = 200) -> str:
    """text on one line, without control characters or lone surrogates: safe in a row, a commit message, a file.
    The cut drops a space it ends on, so that one_line of its own output is the same text."""
    return prepare.one_line_text(str(text))[:limit].rstrip()
