"""The sweep proposer (--proposer sweep): coordinate descent over program.md's search-space block, one
knob value per experiment, judged by the same keep rule; no LLM."""

from __future__ import annotations

import ast
import contextlib
import re

import pandas as pd

from driver.common import FatalError, ReplyError, StopNight, log
from driver.records import Proposal
from driver.keep import best_kept
from driver.knobs import find_knobs, set_knobs
from driver.edits import validate_train_py
from driver.session import Session

# No LLM: coordinate descent over the search space that program.md names in its ```search-space block
# (NAME = [values], knobs in priority order). Each value is tried on top of the best so far and judged by the
# same keep rule; after a pass, the knobs whose best value changed are swept again; then the sweep stops.
SEARCH_SPACE_RE = re.compile(r"^```search-space[ \t]*\n(.*?)^```", re.S | re.M)
SWEEP_ROW_RE = re.compile(r"^sweep: (\S+) (.+) -> (.+)$")
MAX_SWEEP_PASSES = 4           # a knob that keeps flipping under noise cannot hold the night forever


def search_space(program_md: str) -> list[tuple[str, list[str]]]:
    """program.md's search space: [(NAME, [value as written, ...])] in priority order; FatalError says what to fix."""
    blocks = SEARCH_SPACE_RE.findall(program_md)
    where = "program.md's ```search-space block"
    if len(blocks) != 1:
        raise FatalError(f"program.md has {len(blocks) or 'no'} ```search-space blocks (lines `NAME = [value, ...]`): "
                         "the sweep reads exactly one; see the repository's program.md")
    space = []
    for number, line in enumerate(blocks[0].splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            node = ast.parse(line.strip()).body[0]
            assert isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            assert isinstance(node.value, (ast.List, ast.Tuple)) and node.value.elts
            values = [ast.get_source_segment(line.strip(), e) for e in node.value.elts]
            [ast.literal_eval(v) for v in values]
        except (SyntaxError, AssertionError, ValueError, IndexError):
            raise FatalError(f"{where}, line {number}: {line.strip()!r} is not `NAME = [literal, ...]`") from None
        space.append((node.targets[0].id, values))
    if not space:
        raise FatalError(f"{where} is empty: list knobs as `NAME = [value, ...]`, one a line")
    return space


def literal_value(text: str):
    with contextlib.suppress(ValueError, SyntaxError):
        return ast.literal_eval(text)
    return text


def sweep_history(rows: pd.DataFrame) -> list[tuple[str, str, str, bool]]:
    """The sweep's experiments so far, from the ledger (so a restart resumes the sweep): (NAME, old, new, kept)."""
    history = []
    for description, status in zip(rows["description"].fillna(""), rows["status"]):
        match = SWEEP_ROW_RE.match(description)
        if match:
            history.append((*match.groups(), status == "keep"))
    return history


def sweep_next(space: list[tuple[str, list[str]]], current: dict[str, str],
               history: list[tuple[str, str, str, bool]]) -> tuple[tuple[str, str, str] | None, int]:
    """((NAME, current value, value to try) or None when the sweep is done, the pass it is in). Replays the
    sweep from its start: current holds the knobs' values now (as written), history the experiments so far."""
    value = dict(current)
    for name, old, _, _ in reversed(history):  # back to the values the sweep started from
        value[name] = old
    done = list(history)
    knobs = [name for name, _ in space if name in value]
    values = dict(space)
    passes = 0
    while knobs and passes < MAX_SWEEP_PASSES:
        passes += 1
        changed = []
        for name in knobs:
            start = value[name]
            for candidate in values[name]:
                if literal_value(candidate) == literal_value(value[name]):
                    continue  # the best value itself: nothing to try
                if done and done[0][0] == name and literal_value(done[0][2]) == literal_value(candidate):
                    if done.pop(0)[3]:
                        value[name] = candidate
                    continue
                return (name, value[name], candidate), passes
            if literal_value(value[name]) != literal_value(start):
                changed.append(name)
        knobs = changed
    return None, passes


def sweep_summary(rows: pd.DataFrame, passes: int) -> str:
    history = sweep_history(rows)
    kept = [f"{name} {old} -> {new}" for name, old, new, keep in history if keep]
    best = best_kept(rows)
    return (f"the sweep is done: {len(history)} experiments in {passes} pass(es), best val_ppl "
            f"{best if best is None else f'{best:.4g}'}; kept: {', '.join(kept) or 'nothing'}")


def sweep_proposal(session: Session, n: int, train_py: str) -> Proposal:
    """The sweep's next change, in the shape of an LLM proposal (no tokens); StopNight when it is done."""
    rows = session.rows()
    space = search_space((session.root / "program.md").read_text())
    current = {name: knob["text"] for name, knob in find_knobs(train_py).items()}
    missing = [name for name, _ in space if name not in current]
    if missing:
        log(f"sweep: {', '.join(missing)} not constants of train.py: skipped")
    step, passes = sweep_next(space, current, sweep_history(rows))
    if step is None:
        raise StopNight(sweep_summary(rows, passes))
    name, old, new = step
    proposal = {"description": f"sweep: {name} {old} -> {new}", "prompt_tokens": None, "completion_tokens": None,
                "seen": int(rows["experiment"].max()) if len(rows) else None, "base": train_py}
    try:
        changed = set_knobs(train_py, {name: new})
        validate_train_py(train_py, changed)
    except ReplyError as exc:  # a value program.md lists but train.py cannot take: an invalid row says why
        return {**proposal, "error": f"program.md's search space: {exc}"}
    log(f"sweep pass {passes}: {name} {old} -> {new}")
    return {**proposal, "train_py": changed}
