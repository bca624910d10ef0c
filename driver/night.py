"""The night: set up the branch and the sandbox, resume, then run experiments until a budget or a stop ends
it: one at a time on the local slot, or many at once on Ray (pool.py)."""

from __future__ import annotations

import signal

from driver.common import log
from driver.runner import kill_tree
from driver.session import Session, budget_left, setup_sandbox
from driver.checkout import setup_branch
from driver.propose import abandon
from driver.experiment import resume, run_baselines, run_one

def install_interrupt_handler(session: Session) -> None:
    def handler(signum, frame):
        session.interrupts += 1
        if session.interrupts == 1:
            log("Ctrl-C: finishing the current experiment, then stopping (Ctrl-C again to stop now)")
            return
        if session.child is not None:
            kill_tree(session.child, session.known_children)
        raise KeyboardInterrupt

    def terminate(signum, frame):
        """A closed terminal (SIGHUP) or `systemd stop`/kill (SIGTERM): stop now, taking the run along."""
        log(f"{signal.Signals(signum).name}: stopping now")
        session.interrupts = max(session.interrupts, 1)
        if session.child is not None:
            kill_tree(session.child, session.known_children)
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)


def run_loop(session: Session) -> int:
    install_interrupt_handler(session)
    setup_branch(session)
    setup_sandbox(session)
    done = resume(session)
    if session.args.workers > 1 or session.args.gpus or session.args.ray:
        from driver import pool  # Ray is needed only here
        return pool.run_pool(session)
    run_baselines(session)
    pending = None
    while not (reason := budget_left(session, done)):
        _, pending = run_one(session, pending, prefetch=session.args.pipeline and not budget_left(session, done + 1))
        done += 1
    if pending is not None:
        abandon(session, pending, f"the driver stopped ({reason}) before it could run")
    log(f"stopping: {reason}")
    return 0
