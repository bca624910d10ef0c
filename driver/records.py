"""The three records the driver's parts pass each other, named once: a proposal (what the proposer returns), an
experiment's state (what .git/autoresearch/<tag>/state.json and inflight/<n>.json hold) and a run's result (what
scoring and the Ray task return). Plain dicts at run time (TypedDict): written as JSON, sent through Ray, and an
old night's files load as they are. A field the code writes must be listed here (tests/test_records.py)."""

from typing import Required, TypedDict


class RunResult(TypedDict, total=False):
    """One run of train.py and the evaluator: the ledger's fields, a failure as status and reason. Written by
    scoring.run_outcome, experiment.checked_and_scored / guarded_run, worker.run_experiment, pool.Pool.collect/lost."""
    status: str              # crash | timeout | invalid when it did not score; absent when scored (keep_rule decides)
    reason: str              # why it did not score (with status): the row's reason
    val_ppl: float           # the evaluator's validation perplexity (run_outcome)
    protocol: str            # the evaluator's protocol label: only results of one protocol are compared (run_outcome)
    submission_sha256: str   # the digest of the submission copied at train.py's exit, the file scored (run_outcome)
    train_s: float           # train.py's wall-clock seconds (checked_and_scored, the worker)
    eval_s: float            # the evaluator's wall-clock seconds (run_outcome)
    eval_windows: float | None     # the eval JSON's windows scored (scoring.reported_numbers, SCORE_NUMBERS)
    bits_per_weight: float | None  # the eval JSON's bits per weight of the submission (reported_numbers)
    steps: float | None            # train.py's meta: its training steps (reported_numbers)
    train_tokens: float | None     # train.py's meta: the tokens it trained on (reported_numbers)
    peak_mem_gb: float | None      # train.py's meta: its peak GPU memory (reported_numbers)
    dropped: str             # the eval JSON's numbers left empty as not finite, for the row's reason (reported_numbers)
    note: str                # the start of the row's reason: "unsandboxed; ", "worker gpu0; ", files a run changed and
                             # the driver restored (checked_and_scored, the worker, Pool.collect)
    ledger_note: str         # the run changed results.tsv and it was restored (record.checked_ledger)
    worker: str              # the worker's name, gpu<id> or <host>/gpu<id> (worker.run_experiment)
    node: str                # the Ray node it ran on, to fetch a kept submission from (worker.run_experiment)
    folder: str              # the run folder on that host (worker.run_experiment)
    submission: str          # the scored submission's path on that host (worker.run_experiment)
    logs: dict[str, str]     # log name -> its tail, from a host without the driver's disk (worker.run_experiment;
                             # pool.clean drops it before the result is saved or decided on)


class Proposal(TypedDict, total=False):
    """A change to train.py, or why there is none: returned by propose.propose / Prefetch.result / proposal_for
    (the LLM) and sweep.sweep_proposal (no LLM). "error" in it: the experiment is an invalid row."""
    base: Required[str]      # the train.py it was proposed on (proposal_for rebases it when a keep came meanwhile)
    seen: Required[int | None]  # the highest experiment number in the ledger when it was asked for (ledger's seen)
    prompt_tokens: Required[int | None]      # the LLM's prompt tokens billed to it, repairs and an abandoned
                                             # prefetch included (propose.tokens_since); None from the sweep
    completion_tokens: Required[int | None]  # the LLM's completion tokens billed to it, as prompt_tokens
    description: str         # the one line saying what it changes (absent when an LLM reply could not be used)
    train_py: str            # the new train.py (absent with error)
    reply: tuple[str, str]   # the LLM's (reply, finish reason), to apply the same blocks on a newer train.py
    error: str               # why no change could be used (the rejected reply's error, a context overflow, a bad knob)


class ExperimentState(TypedDict, total=False):
    """One experiment on its way from proposal to recorded decision: state.json (the local slot, Session.save_state:
    one experiment, with its phase) and inflight/<n>.json (--workers, Pool.save: one per experiment in flight). A
    restarted driver resumes from it, so every field stays readable by later drivers (tests/test_old_night.py)."""
    experiment: Required[int]  # its number, the ledger's experiment column (experiment.run_one/run_baselines,
                               # Pool.allocate)
    kind: str                # baseline | proposal | reapply (a stale win made again on the best, pool) | redo (that
                             # re-application being asked for again from the LLM, inflight/ only)
    phase: str               # state.json only, where a restart picks up: llm, applying, committed, training,
                             # confirming, scoring, deciding, recorded, discarding, done; moving (Pool.move_branch)
    parent: str              # the commit it was made and is scored on
    commit: str              # its own commit, once made (experiment.apply_and_commit, Pool.commit_change)
    description: str         # the proposal's line, a baseline's, or "re-applied on <commit>: ..." (pool)
    seen: int | None         # from its Proposal: the ledger's seen column
    prompt_tokens: int | None      # from its Proposal (propose.tokens_since): billed on its row
    completion_tokens: int | None  # from its Proposal, as prompt_tokens
    first: RunResult         # the first run's result while its confirmation run goes on (run_committed, Pool.collect)
    label: str               # "-confirm" while its confirmation run goes on (pool): names that run's logs and folder
    result: RunResult        # phase deciding: the result decided on, for a restart to write its rows
    confirm: RunResult | None  # phase deciding: the confirmation run's result, if there was one
    reapply_as: int          # pool: the number of the experiment that re-applies this stale win (Pool.finish)
    reapplied_from: int      # pool: the experiment whose stale win this one re-applies (start_reapply, propose_and_run)
    rerun_as: int            # pool: the number it runs again as after its worker was lost (Pool.lost)
    reruns: int              # pool: how often this change already ran again after a lost worker (start_rerun)
