"""The overnight driver's parts, one file per mechanism, in layers: each file imports only from the files
listed before it. agent.py (the entry point) is above them all; nothing imports it.

    common      errors, log, atomic writes, small helpers
    records     the records passed around: a proposal, an experiment's state, a run's result (TypedDicts)
    keep        the keep rule and the decisions around it (pure: no I/O)
    ledger      results.tsv: read, repair, reconcile with the driver's copy
    runner      one host's processes: hardening, environment, run, watch, kill
    scoring     one run of train.py and the evaluator: sandbox plan, files, the submission at exit, the score
    knobs       train.py's named constants: listing, schema, setting them (--reply-format knob)
    edits       the LLM's reply: parse, apply, validate
    session     the night's state: paths, lock, sandbox set-up, stops and budgets
    llm         the OpenAI-compatible client: context window, retries and refusals, chat
    checkout    git and the working tree: branch, commits, discards, restoring the tree after a run or a kill
    record      a decision written: the rows, the cost, the best submission kept
    propose     the LLM proposer: the prompt, repairs, prefetch
    sweep       the sweep proposer: coordinate descent over program.md's search space
    experiment  one experiment's life on the local slot: propose, commit, train and score, decide, record, resume
    worker      the Ray task: one experiment on one GPU of any host (imports only runner, scoring, records and common)
    cluster     Ray: a local instance or the cluster at --ray
    pool        many experiments at once on Ray (--workers, --gpus, --ray)
    night       the loop: one local slot, or the pool
    report      status, report, plot
"""
