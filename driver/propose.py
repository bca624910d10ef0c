"""The LLM proposer: the prompt (program.md, train.py, the ledger), shrunk to the context window; repair
turns for a reply that does not apply; the next proposal asked for while the current experiment runs."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import threading
from pathlib import Path

import git
import pandas as pd

from driver.common import ReplyError, atomic_write, log, one_line
from driver.records import Proposal
from driver.keep import best_kept, night_protocol, noise, same_protocol
from driver.ledger import LEDGER_TAIL_ROWS, ledger_for_prompt
from driver.runner import LOG_TAIL_BYTES, log_tail
from driver.knobs import KNOB_SYSTEM_PROMPT, knob_listing, knob_schema
from driver.edits import TOO_DEEP, edit_train_py
from driver.session import Session
from driver.llm import ContextOverflow, chat, estimate_tokens, reply_tokens
from driver.record import append_invalid

MESSAGE_OVERHEAD_TOKENS = 8    # a chat template's tokens around each message
CONTEXT_MARGIN_TOKENS = 64     # slack for the template and the estimate
MIN_REPLY_TOKENS = 1024        # the prompt shrinks until at least this much is left for the reply
COMMIT_ID = r"[0-9a-f]{40}|[0-9a-f]{64}"  # as the driver writes a commit: its full id (SHA-1 or SHA-256)
# a prompt or reply file's number as the driver writes it: ASCII digits, few of them. Anything else in the folder is
# another's (an unsandboxed train.py writes where it likes): "prompt²" is no number to int(), and a planted
# 244-digit one would make the next name longer than a file name may be
TURN_NUMBER = re.compile(r"[0-9]{1,9}")
SCORED = ("baseline", "keep", "discard")  # a train.py with a score: running it again would measure only the noise
SYSTEM_PROMPT = """You are an autonomous ML research agent improving ternary (1.58-bit) quantization-aware \
training in train.py. Each reply proposes exactly ONE focused change to train.py; it is committed, \
trained for 5 minutes and scored by a separate, read-only evaluator (WikiText-2 validation perplexity \
of the exported ternary weights). Lower val_ppl is kept; anything else is reverted.

Rules: change only train.py. Keep `prepare.submit(...)` at the end of training. Never read or train \
on the validation or test data. The code must run: an edit that does not apply or compile is wasted.

Reply format, exactly:
DESCRIPTION: <one line saying what you changed and why>
<<<<<<< SEARCH
<lines copied exactly from train.py, enough to match exactly once>
=======
<the new lines>
>>>>>>> REPLACE

Use one or more SEARCH/REPLACE blocks. To rewrite the whole file instead, use one block:
<<<<<<< FILE
<the complete new train.py>
>>>>>>> FILE
No other text is needed."""
JSON_INSTRUCTIONS = ('\n\nReply with ONE JSON object instead: {"description": "<one line>", "edits": '
                     '[{"search": "<exact lines of train.py>", "replace": "<new lines>"}]}')


def build_prompt(session: Session, train_py: str, in_flight: str | list | None = None,
                 rows: pd.DataFrame | None = None, ledger_rows: int = LEDGER_TAIL_ROWS,
                 log_bytes: int = LOG_TAIL_BYTES, redo: str | None = None) -> list[dict]:
    """The prompt. in_flight: the experiment training meanwhile (its description), or with --workers the
    experiments in flight [(description, parent commit)]; redo: a stale win to make again on this train.py."""
    rows = session.rows() if rows is None else rows
    baseline = rows[rows["status"] == "baseline"]["val_ppl"].dropna()
    best = best_kept(rows)
    knob = session.args.reply_format == "knob"  # a weak model chooses among named constants instead of writing code
    # what changes least comes first: a server's prefix cache (llama.cpp, vLLM, OpenAI) then reuses program.md and
    # train.py for every request until a change is kept, and reads only the ledger's new rows
    code = ("# train.py's constants (current values and comments)\n" + knob_listing(train_py) if knob
            else "# train.py (current)\n```python\n" + train_py + "```")
    parts = ["# program.md\n" + (session.root / "program.md").read_text(), code,
             "# results so far (this branch)\n" + ledger_for_prompt(rows, ledger_rows),
             f"baseline val_ppl: {baseline.iloc[0] if len(baseline) else 'n/a'}; best kept val_ppl: {best or 'n/a'}; "
             f"run-to-run noise (std of {len(baseline)} baseline runs): {noise(rows) if noise(rows) is not None else 'n/a'}"]
    if len(rows) and rows.iloc[-1]["status"] in ("crash", "timeout") and log_bytes:
        last = rows.iloc[-1]
        tail = log_tail(session.runs / str(int(last["experiment"])) / "train.log", log_bytes)
        parts.append(f"# the last run ({last['status']}: {last['reason']}) ended with this output\n{tail}")
    if isinstance(in_flight, str) and in_flight:
        parts.append(f"# in flight\nThis experiment is training now, its result not known yet: \"{in_flight}\". "
                     "It is NOT in the train.py above. If it is kept, your change is applied on top of it: propose a "
                     "different change that does not touch the same lines.")
    elif in_flight:  # --workers: several at once, each on the train.py it was proposed on
        listed = "\n".join(f"- \"{description}\" (on commit {parent[:8]})" for description, parent in in_flight)
        parts.append(f"# in flight\nThese experiments are training now on other GPUs, their results not known yet; "
                     f"they are NOT in the train.py above:\n{listed}\nPropose something DIFFERENT from each of them, "
                     "touching other lines: a change that is kept is applied on top of the others.")
    if redo:
        parts.append(f"# re-apply\nThis change won on an earlier train.py, but the changes kept since conflict with "
                     f"it: \"{redo}\". Make the SAME change to the current train.py above.")
    if knob:
        parts.append('Change ONE or TWO constants: reply {"description": "...", "set": {"NAME": "<value>"}}.')
        return [{"role": "system", "content": KNOB_SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]
    parts.append("Propose ONE focused change to train.py in the reply format.")
    system = SYSTEM_PROMPT + (JSON_INSTRUCTIONS if session.args.reply_format == "json" else "")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


# How the prompt shrinks to fit the server's context, fullest first: (ledger rows shown, bytes of a crashed
# run's log, repair history: every earlier reply / the last one / only the last error, without the reply)
PROMPT_SIZES = ((LEDGER_TAIL_ROWS, LOG_TAIL_BYTES, "all"), (LEDGER_TAIL_ROWS, LOG_TAIL_BYTES, "last"),
                (10, 1000, "last"), (3, 300, "error"), (0, 0, "error"))


def repair_request(error: str) -> str:
    return f"Your reply could not be used: {error}\nReply again with ONE change to train.py in the exact format."


def with_history(messages: list[dict], history: list[tuple[str, str]], keep: str) -> list[dict]:
    """The first prompt plus the repair turns so far ((reply, why it was rejected) each), as much as `keep` says."""
    if not history:
        return messages
    if keep == "error":  # no earlier reply at all: the last rejection joins the prompt (roles keep alternating)
        return messages[:-1] + [{"role": "user", "content": messages[-1]["content"] + "\n\n" + repair_request(history[-1][1])}]
    turns = history if keep == "all" else history[-1:]
    return messages + [m for content, error in turns for m in (
        {"role": "assistant", "content": content[:20000]}, {"role": "user", "content": repair_request(error)})]


def prompt_tokens_estimate(session: Session, messages: list[dict]) -> int:
    return sum(estimate_tokens(m["content"], session.chars_per_token) + MESSAGE_OVERHEAD_TOKENS for m in messages)


def fitted_request(session: Session, train_py: str, in_flight, rows: pd.DataFrame,
                   history: list[tuple[str, str]], squeeze: bool = False, redo: str | None = None) -> tuple[list[dict], int]:
    """One LLM call's (messages, max_tokens) within the server's context: the prompt shrinks (fewer ledger
    rows, a shorter log tail, less repair history) until MIN_REPLY_TOKENS are left, and max_tokens is capped
    to what is left. squeeze: the server refused a request as too long; take the smallest prompt."""
    want = reply_tokens(session.args, train_py)
    if squeeze:
        want = min(want, MIN_REPLY_TOKENS)
    for ledger_rows, log_bytes, keep in PROMPT_SIZES[-1:] if squeeze else PROMPT_SIZES:
        messages = with_history(build_prompt(session, train_py, in_flight, rows, ledger_rows, log_bytes, redo), history, keep)
        if session.context is None:
            return messages, want
        left = session.context - prompt_tokens_estimate(session, messages) - CONTEXT_MARGIN_TOKENS
        if left >= min(want, MIN_REPLY_TOKENS):
            break
    # even the smallest prompt may not leave enough: the server, whose tokenizer is exact, decides
    return messages, max(min(want, left), 128)


def overflow_error(message: str) -> str:
    return (f"the prompt does not fit the LLM's context even shrunk ({message}): give the server a larger context "
            "(llama-server -c 16384, vllm --max-model-len) or pass a smaller --max-tokens")


def propose(session: Session, n: int, train_py: str, in_flight=None, rows: pd.DataFrame | None = None,
            spent: list | None = None, redo: str | None = None, scored: dict[str, str] | None = None) -> Proposal:
    """Ask the LLM for one change to `train_py`, with repair turns. Returns the description, the new
    text and the reply (for a later rebase), or the failure; with the tokens used and what it had seen.
    spent: each answered call's (prompt, completion) tokens are appended as it returns, so that a caller
    that gives up on this proposal (a stop, an exception) can still bill them. rows, scored: the ledger and
    scored_train_pys() as the main thread read them (a prefetch thread must not start git)."""
    folder = session.runs / str(n)
    folder.mkdir(parents=True, exist_ok=True)
    rows = session.rows() if rows is None else rows
    scored = scored_train_pys(session, rows) if scored is None else scored
    seen = int(rows["experiment"].max()) if len(rows) else None
    spent = [] if spent is None else spent
    before = len(spent)
    history: list[tuple[str, str]] = []
    error = ""
    first = next_turn(folder)
    schema = None  # knob: built from train.py as it is now, without the options that remake a scored train.py
    if session.args.reply_format == "knob":
        schema = knob_schema(train_py, lambda text: bool(scored_before(scored, text)))
    for turn in range(session.args.repair_turns + 1):
        squeeze = False
        while True:  # a request the server finds too long: shrink it and try once more
            messages, max_tokens = fitted_request(session, train_py, in_flight, rows, history, squeeze, redo)
            atomic_write(folder / f"prompt{first + turn}.json", json.dumps(messages, indent=1))
            try:
                content, finish, p_tok, c_tok = chat(session, messages, max_tokens, schema)
                break
            except ContextOverflow as exc:
                if squeeze:
                    error = overflow_error(str(exc))
                    log(f"experiment {n}: {error}")
                    return {"error": error, **tokens_since(spent, before), "seen": seen, "base": train_py}
                squeeze = True
                if exc.n_ctx:
                    session.context = min(session.context or exc.n_ctx, exc.n_ctx)
                session.chars_per_token = max(session.chars_per_token * 0.8, 1.0)  # the estimate was short
                log(f"experiment {n}: the LLM refused the prompt as too long ({exc}); shrinking it and asking again")
        spent.append((p_tok, c_tok))
        atomic_write(folder / f"response{first + turn}.md", content or "")
        try:
            description, new = edit_train_py(train_py, content, finish, session.args.reply_format)
            if twin := scored_before(scored, new):
                raise ReplyError(f"this change makes train.py the same program as the file {twin} ran (comments, "
                                 "spacing and number spellings aside): its score is known. Propose a different change")
            return {"description": description, "train_py": new, **tokens_since(spent, before), "seen": seen,
                    "base": train_py, "reply": (content, finish)}
        except ReplyError as exc:
            error = str(exc)
            log(f"experiment {n}: reply rejected (turn {turn + 1}): {one_line(error, 150)}")
            history.append((content or "", error))
    return {"error": error, **tokens_since(spent, before), "seen": seen, "base": train_py}


def next_turn(folder: Path) -> int:
    """The number of the next prompt and reply file: a second ask for the same experiment (after a prefetch that
    cannot be used, a pool's re-ask, a killed driver's) keeps the first ask's files beside its own."""
    numbers = [int(p.stem.removeprefix(stem)) for stem in ("prompt", "response") for p in folder.glob(f"{stem}*")
               if TURN_NUMBER.fullmatch(p.stem.removeprefix(stem))]
    return max(numbers, default=-1) + 1


def scored_train_pys(session: Session, rows: pd.DataFrame) -> dict[str, str]:
    """Each train.py this branch ran and scored under this start's protocol, by its program_digest, with what to
    tell the LLM ("experiment 3 (discard, val_ppl 41.2)"). Main thread only: a git process started while a run is
    on (a prefetch's) is taken for one of train.py's strays and killed."""
    found = {}
    rows = same_protocol(rows, night_protocol(session.args))  # a smoke run's score is no full night's: not known
    named = rows["commit"].astype(str).str.fullmatch(COMMIT_ID)  # never a name like HEAD~2 a hand edit left
    numbered = rows["experiment"].notna()  # a hand edit's empty (or inf) number names no experiment to the LLM
    for row in rows[rows["status"].isin(SCORED) & rows["val_ppl"].notna() & named & numbered].itertuples():
        found.setdefault(program_at(session, row.commit),
                         f"experiment {int(row.experiment)} ({row.status}, val_ppl {row.val_ppl:.4g})")
    found.pop("", None)
    return found


def program_at(session: Session, commit: str) -> str:
    """The program_digest of train.py at `commit`, "" where git lacks it. Read once a night: a commit never
    changes. Main thread only (see scored_train_pys)."""
    if commit not in session.train_py_digests:
        try:
            data = (session.repo.commit(commit).tree / "train.py").data_stream.read()
            session.train_py_digests[commit] = program_digest(data.decode("utf-8", errors="replace"))
        except (ValueError, KeyError, git.GitError, git.BadName, git.BadObject):  # a commit git lacks
            session.train_py_digests[commit] = ""
    return session.train_py_digests[commit]


def scored_before(scored: dict[str, str], train_py: str) -> str:
    """The experiment that already scored this program, else "" (see program_digest)."""
    return scored.get(program_digest(train_py), "")


def program_digest(train_py: str) -> str:
    """What train.py computes, as a digest: its syntax tree, so that a comment, the spacing or a number's spelling
    (3e-4, 0.0003) makes no new experiment (a small model re-proposes a change in other words). A file Python
    cannot parse: its bytes."""
    try:
        text = ast.dump(ast.parse(train_py))
    except (SyntaxError, ValueError, *TOO_DEEP):
        text = f"bytes:{train_py}"
    return hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()


def tokens_since(spent: list, start: int = 0) -> dict:
    calls = list(spent)[start:]  # a snapshot: a prefetch thread may still append
    return {"prompt_tokens": sum(p for p, _ in calls), "completion_tokens": sum(c for _, c in calls)}


class Prefetch(threading.Thread):
    """The next experiment's proposal, asked for while the current one trains (a daemon thread: a hung
    LLM call never blocks the driver's exit). spent: its answered calls' tokens, readable at any time."""

    def __init__(self, session: Session, n: int, base: str, in_flight, redo: str | None = None):
        super().__init__(daemon=True, name=f"propose-{n}")
        self.n = n
        self.spent: list[tuple[int, int]] = []
        rows = session.rows()  # a snapshot: the ledger grows meanwhile
        self.call = (session, n, base, in_flight, rows, self.spent, redo, scored_train_pys(session, rows))
        self.proposal: Proposal | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.proposal = propose(*self.call)
        except BaseException as exc:  # re-raised in the main thread by result()
            self.error = exc

    def result(self) -> Proposal:
        self.join()
        if self.error is not None:
            raise self.error
        return self.proposal


def proposal_for(session: Session, n: int, base: str, pending: Prefetch | None, spent: list | None = None) -> Proposal:
    """The prefetched proposal if it still applies to train.py as it is now, else a fresh one. spent gathers
    every answered call's tokens for experiment n, the abandoned prefetch's included."""
    spent, proposal = [] if spent is None else spent, None
    if pending is not None:
        try:
            proposal = pending.result()
        finally:
            spent.extend(pending.spent)  # billed to experiment n whether it is used, replaced or failed
    rows = session.rows()
    scored = scored_train_pys(session, rows)  # the experiment in flight when it was asked for has a score now
    if proposal is not None and (usable := prefetched_on(session, n, base, proposal, scored)) is not None:
        return {**usable, **tokens_since(spent)}
    fresh = propose(session, n, base, rows=rows, spent=spent, scored=scored)
    return {**fresh, **tokens_since(spent)}


def prefetched_on(session: Session, n: int, base: str, proposal: Proposal, scored: dict[str, str]) -> Proposal | None:
    """A prefetched proposal as it applies to train.py now (base), or None to ask again: when the experiment in
    flight was kept, the reply's blocks must apply on top of it; either way, the train.py it makes must not be
    one already scored."""
    if "error" in proposal:  # its rejection stands, unless it was about a train.py since replaced
        return proposal if proposal["base"] == base else None
    if proposal["base"] != base:
        try:
            description, new = edit_train_py(base, *proposal["reply"], session.args.reply_format, blocks_only=True)
        except ReplyError as exc:
            log(f"experiment {n}: the prefetched change does not apply on top of the kept one ({one_line(exc, 100)}); "
                "asking again")
            return None
        proposal = {**proposal, "description": description, "train_py": new, "base": base}
    if twin := scored_before(scored, proposal["train_py"]):
        log(f"experiment {n}: the prefetched change makes train.py the same program as the file {twin} ran; "
            "asking again")
        return None
    return proposal


def abandon(session: Session, pending: Prefetch, why: str) -> None:
    """A prefetched proposal that will never run (the driver stops): the calls it made are billed in an
    `invalid` row of its own number; one still being asked for is not waited for."""
    tokens = tokens_since(pending.spent)
    if not pending.spent:
        return
    proposal = None if pending.is_alive() else pending.proposal
    if pending.error is not None:
        reason, description = f"not run: {why}; asking for it failed ({one_line(pending.error, 150)})", "(abandoned)"
    elif proposal is not None and "error" in proposal:
        reason, description = proposal["error"], "(reply rejected)"
    elif proposal is not None:
        reason, description = f"not run: {why}", proposal["description"]
    else:
        reason, description = f"not run: {why} while its proposal was still being asked for", "(abandoned)"
    append_invalid(session, pending.n, session.repo.head.commit.hexsha, reason, tokens,
                   (proposal or {}).get("seen"), description)
    log(f"experiment {pending.n}: the prefetched proposal will not run; its {sum(tokens.values())} LLM tokens are "
        "in the ledger")
