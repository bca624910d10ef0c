"""Many experiments at once: `agent.py --workers N`, `--gpus 0,2,5` or `--ray ADDRESS`.

One driver process (this one) owns the branch, the ledger and every keep/discard decision. Each
experiment is a Ray task asking for one GPU (worker.run_experiment), in its own git worktree
runs/<tag>/<n>/tree and run folder. Ray, for one host too: each run is in a worker process that runs
nothing else meanwhile (so killing one run's strays can never touch another run), Ray assigns the GPUs
and reports a lost worker, and the same code serves a cluster. The one-GPU path (night.run_loop) needs no Ray.

Stale parents: while an experiment trains, another may be kept. A result measured on the current best
is decided as on one GPU. A result on a parent that is no longer the best, that beats the best or its own
parent beyond the noise (keep.stale_parent), is recorded as a discard and re-applied on top of the best
(git merge-file, three-way; re-proposed by the LLM when it conflicts), as a new experiment whose own run
decides: the chain on the branch stays a chain of changes, each scored on its exact parent.

Kill and resume: before its task starts, each experiment in flight has a state file
.git/autoresearch/<tag>/inflight/<n>.json; a restarted driver finishes the recorded ones and runs the
others again, without asking the LLM again.
"""
import contextlib
import hashlib
import json
import re
import socket
import time
from pathlib import Path

import git

from driver.common import GIT_SAFE_CONFIG, FatalError, atomic_write, atomic_write_bytes, log, one_line
from driver.records import ExperimentState, RunResult
from driver.keep import (BASELINE_TRIES, baseline_complete, baseline_description, baseline_failure, baseline_failures,
                         confirmation_needed, keep_rule, night_protocol, scored_baselines, stale_parent)
from driver.runner import kill_leftovers
from driver.session import Session, budget_left, stop_reason
from driver.checkout import git_identity, merge, restore_tree, tree_changes
from driver.record import (append_invalid, append_rows, decision_rows, keep_best_submission, protect_ledger,
                           recorded_status)
from driver.propose import (Prefetch, abandon, program_at, program_digest, scored_before, scored_train_pys,
                            tokens_since)
from driver.experiment import next_experiment
from driver import worker
from driver.cluster import start_ray

POLL_S = 0.5                   # how often the loop looks at finished tasks and proposals
MAX_RERUNS = 2                 # a lost worker's experiment runs again elsewhere at most this often
MAX_ASKS = 3                   # a proposal overtaken by a keep it conflicts with is asked for this often in all
MAX_FILES_BYTES = 5_000_000    # the commit's files sent to a host that does not share the driver's disk


# ---------------------------------------------------------------- one night with N workers
class Pool:
    def __init__(self, session: Session, ray, slots: int):
        self.session, self.ray, self.slots = session, ray, slots
        self.args = session.args
        self.flights: dict[object, ExperimentState] = {}  # Ray ObjectRef -> the experiment's state
        self.asking: list[Prefetch] = []
        self.started = 0                   # proposals asked for in this start (--max-experiments counts them)
        self.stopping = ""
        session.inflight_dir.mkdir(exist_ok=True)
        # max_calls=0: a worker process is reused (Ray would start a fresh one per GPU task, 2.5 s of imports);
        # it runs one experiment at a time, and kill_tree ends everything the last one started
        self.task = ray.remote(num_gpus=1, num_cpus=0, max_retries=0, max_calls=0)(worker.run_experiment)
        self.fetch = ray.remote(num_cpus=0, max_retries=1)(worker.read_submission)
        self.next_n = next_experiment(session)
        self.before = tree_changes(session)  # the user's own uncommitted work, for restore_tree
        self.key = f"{hashlib.sha256(str(session.root).encode()).hexdigest()[:12]}-{self.args.tag}"

    # -------- git: commits in worktrees, never in the user's checkout until kept
    def head(self) -> str:
        return self.session.repo.head.commit.hexsha

    def train_py_at(self, commit: str) -> str:
        return self.session.repo.commit(commit).tree["train.py"].data_stream.read().decode()

    def tree_of(self, n: int) -> Path:
        return self.session.runs / str(n) / "tree"

    def make_tree(self, n: int, commit: str) -> Path:
        """runs/<tag>/<n>/tree: a worktree at `commit` (an older one of the same number is replaced)."""
        tree, repo = self.tree_of(n), self.session.repo
        if tree.exists():
            repo.git.worktree("remove", "--force", str(tree))
        repo.git.worktree("prune")
        repo.git.worktree("add", "--detach", str(tree), commit)
        return tree

    def drop_tree(self, n: int) -> None:
        tree = self.tree_of(n)
        if tree.exists():
            self.session.repo.git.worktree("remove", "--force", str(tree))

    def commit_change(self, n: int, parent: str, train_py: str, description: str) -> str:
        """The change as a commit on `parent`, made in the experiment's worktree and held by a ref; its diff goes
        to runs/<tag>/<n>/diff.patch, as every experiment's."""
        tree = self.make_tree(n, parent)
        atomic_write(tree / "train.py", train_py)
        wt = git.Repo(tree)
        wt.git.set_persistent_git_options(c=GIT_SAFE_CONFIG)
        with wt.git.custom_environment(**git_identity(self.session)):
            wt.git.commit("--no-verify", "-m", f"{description}\n\nautoresearch experiment {n}", "--", "train.py")
        commit = wt.head.commit.hexsha
        self.session.repo.git.update_ref(self.ref(n), commit)
        atomic_write(self.session.runs / str(n) / "diff.patch", self.session.repo.git.diff(parent, commit) + "\n")
        return commit

    def ref(self, n: int, kind: str = "inflight") -> str:
        return f"refs/autoresearch/{self.args.tag}/{kind}/{n}"

    def move_branch(self, st: ExperimentState) -> None:
        """A keep: the branch (and the checkout's train.py) moves to the commit. Phase `moving` lets a restart
        put train.py back if the driver dies between the two steps."""
        session = self.session
        session.save_state(experiment=st["experiment"], phase="moving")
        session.repo.git.checkout(st["commit"], "--", "train.py")
        session.repo.git.reset("--soft", st["commit"])
        session.save_state(experiment=st["experiment"], phase="done")

    # -------- the state of each experiment in flight, on disk
    def save(self, st: ExperimentState) -> None:
        atomic_write(self.session.inflight_dir / f"{st['experiment']}.json", json.dumps(st))

    def forget(self, st: ExperimentState) -> None:
        (self.session.inflight_dir / f"{st['experiment']}.json").unlink(missing_ok=True)

    def allocate(self) -> int:
        n = self.next_n
        self.next_n += 1
        return n

    # -------- running
    def spec(self, st: ExperimentState) -> dict:
        session, n = self.session, st["experiment"]
        shared = not self.args.ray
        files = {}
        if not shared:  # the commit's tracked files, for a host with a disk of its own
            tree = session.repo.commit(st["commit"]).tree
            for blob in tree.traverse():  # the real names (`git ls-tree` quotes unusual ones), files only
                path = blob.path
                if blob.type != "blob" or blob.mode == 0o120000:  # a folder, a link
                    continue
                if blob.size <= MAX_FILES_BYTES - sum(map(len, files.values())):
                    files[path] = blob.data_stream.read().decode("utf-8", errors="replace")
        return {"experiment": n, "label": st.get("label", ""), "tree": str(self.tree_of(n)), "shared_disk": shared,
                "files": files, "key": self.key, "driver_host": socket.gethostname(),
                "prepare_sha256": session.prepare_hash, "timeout": self.args.timeout,
                "eval_timeout": self.args.eval_timeout, "eval_windows": self.args.eval_windows,
                "sandbox": self.args.sandbox, "model_expected": session.model_expected,
                "tokens_expected": session.tokens_expected}

    def submit(self, st: ExperimentState, fresh: bool = False) -> None:
        """Start the experiment's task. fresh: check its worktree out again first (a confirmation run, or a
        resumed one: an unsandboxed run may have changed its files)."""
        if fresh or st.get("label") or not self.tree_of(st["experiment"]).exists():
            self.make_tree(st["experiment"], st["commit"])
        self.save(st)
        ref = self.task.remote(self.spec(st))
        self.flights[ref] = st
        what = "confirming" if st.get("label") else "training"
        log(f"experiment {st['experiment']}: {what} ({st['description']}) on parent {st['parent'][:8]}; "
            f"{len(self.flights)} in flight")

    def in_flight(self) -> list[tuple[str, str]]:
        return [(st["description"], st["parent"]) for st in self.flights.values() if st["kind"] != "baseline"]

    def ask(self, redo: dict | None = None, n: int | None = None, spent: list | None = None) -> None:
        """Ask for a proposal on the best train.py (a thread: the LLM answers while the GPUs train). n, spent:
        asking again for an experiment number, whose calls so far stay billed to it."""
        again = n is not None
        n = self.allocate() if n is None else n
        base = self.train_py_at(self.head())
        pending = Prefetch(self.session, n, base, self.in_flight(), redo=redo and redo["description"])
        pending.spent.extend(spent or [])
        pending.redo, pending.parent, pending.tries = redo, self.head(), 1
        self.asking.append(pending)
        if not again:
            self.started += 1

    def dispatch(self, pending: Prefetch) -> None:
        """A finished proposal: on the best as it is now (rebased when a keep came meanwhile), committed, run."""
        self.propose_and_run(pending)
        if not any(st["experiment"] == pending.n for st in self.flights.values()) and \
                not any(p.n == pending.n for p in self.asking):  # ran, or recorded without running
            self.forget({"experiment": pending.n})  # a re-proposal's state (kind redo) once its row is written

    def not_to_run(self, new: str | None, best: str, parent: str, head: str) -> str:
        """Why a proposal, as merged onto the best, is not run (else ""): it conflicts with a keep made while it was
        asked for, that keep already made it, or an experiment that scored while it was asked for, or one training
        now, runs the same program (a weak model repeats itself, the experiments in flight listed or not)."""
        if new is None:
            return f"proposed on {parent[:8]}, and it conflicts with the change kept since ({head[:8]})"
        if new == best:
            return f"the change is already in the best train.py ({head[:8]}), kept meanwhile"
        if twin := scored_before(scored_train_pys(self.session, self.session.rows()), new):
            return f"the change makes train.py the same program as the file {twin} ran: its score is known"
        running = {program_at(self.session, st["commit"]): st["experiment"] for st in self.flights.values()
                   if st.get("commit")}
        if (twin := running.get(program_digest(new))) is not None:
            return f"the change makes train.py the same program as experiment {twin}, training now"
        return ""

    def propose_and_run(self, pending: Prefetch) -> None:
        session, n = self.session, pending.n
        proposal = pending.result()
        tokens = tokens_since(pending.spent)
        head = self.head()
        if "error" in proposal:
            append_invalid(session, n, head, proposal["error"], tokens, proposal["seen"],
                                 proposal.get("description") or "(reply rejected)")
            log(f"experiment {n}: invalid  {one_line(proposal['error'], 150)}")
            return
        new, best = proposal["train_py"], self.train_py_at(head)
        if pending.parent != head:  # a keep came while it was being asked for
            new = merge(proposal["base"], best, new)
        if why := self.not_to_run(new, best, pending.parent, head):
            if pending.tries < MAX_ASKS and not self.stopping:
                log(f"experiment {n}: {why}; asking again")
                self.ask(pending.redo, n=n, spent=list(pending.spent))
                self.asking[-1].tries = pending.tries + 1
                return
            append_invalid(session, n, head, f"{why}: not run", tokens, proposal["seen"], proposal["description"])
            log(f"experiment {n}: {why}; not run")
            return
        atomic_write(session.runs / str(n) / "proposed_train.py", new)
        redo = pending.redo
        description = proposal["description"] if redo is None else f"re-applied on {head[:8]}: {redo['description']}"
        st = {"experiment": n, "kind": "reapply" if redo else "proposal", "parent": head, "seen": proposal["seen"],
              "description": description, **tokens}
        if redo and redo.get("reapplied_from") is not None:
            st["reapplied_from"] = redo["reapplied_from"]
        st["commit"] = self.commit_change(n, head, new, description)
        self.submit(st)

    def start_reapply(self, st: ExperimentState) -> None:
        """A stale win, made again on the best: merged when the change still applies, else re-proposed."""
        m, head = st["reapply_as"], self.head()
        best = self.train_py_at(head)
        new = merge(self.train_py_at(st["parent"]), best, self.train_py_at(st["commit"]))
        if new is None:
            log(f"experiment {st['experiment']}: its change conflicts with the best ({head[:8]}); asking the LLM to "
                f"make it again as experiment {m}")
            # on disk before the original's state goes: a restart asks again for the number its ledger row announced
            self.save({"experiment": m, "kind": "redo", "description": st["description"], "seen": st.get("seen"),
                       "reapplied_from": st["experiment"]})
            self.ask(redo={"description": st["description"], "reapplied_from": st["experiment"]}, n=m)
            return
        if new == best:
            log(f"experiment {st['experiment']}: its change is already in the best ({head[:8]}); nothing to re-apply")
            append_invalid(self.session, m, head, f"re-apply of experiment {st['experiment']}: its change is already "
                                 f"in the best train.py ({head[:8]}); not run", {"prompt_tokens": 0, "completion_tokens": 0},
                                 st.get("seen"), f"re-applied on {head[:8]}: {st['description']}")
            return
        description = f"re-applied on {head[:8]}: {st['description']}"
        new_st = {"experiment": m, "kind": "reapply", "parent": head, "description": description, "seen": st.get("seen"),
                  "reapplied_from": st["experiment"]}
        new_st["commit"] = self.commit_change(m, head, new, description)
        self.submit(new_st)

    # -------- results
    def collect(self, ref) -> None:
        st = self.flights.pop(ref)
        n = st["experiment"]
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:  # the worker's own code failed: a bug, not a lost host
            result = {"status": "crash", "reason": f"the worker failed: {one_line(exc, 200)}"}
        except self.ray.exceptions.RayError as exc:  # the worker process or its node died
            self.lost(st, exc)
            return
        self.bring_back(st, result)
        if not self.session.sandbox_abi:  # an unsandboxed run can write the checkout: undo it, as on one GPU
            restored = restore_tree(self.session, self.before, self.head())
            if restored:
                log(f"experiment {n}: a run changed {', '.join(restored)}; restored")
                result["note"] = (result.get("note") or "") + f"a run changed {', '.join(restored[:5])}: restored; "
        if "first" not in st and confirmation_needed(self.session.rows(), result, baseline=st["kind"] == "baseline",
                                                           strict=self.args.strict,
                                                           protocol=night_protocol(self.args)):
            log(f"experiment {n}: val_ppl {result['val_ppl']:.4g} is a marginal gain; confirming")
            self.submit({**st, "first": clean(result), "label": "-confirm"})
            return
        if "first" in st:
            self.finish(st, st["first"], clean(result))
        else:
            self.finish(st, clean(result))

    def lost(self, st: ExperimentState, exc: Exception) -> None:
        """A worker or node died under the experiment: a crash row naming it, and the change runs again."""
        n, reruns = st["experiment"], st.get("reruns", 0)
        # a worker killed on this host leaves its train.py running (own session; the worker was its subreaper):
        # end it by its marker, as a restart does, before Ray hands the GPU to the next task
        kill_leftovers(self.session.runs / str(n) / f"child{st.get('label', '')}.pid")
        if st["kind"] != "baseline" and reruns < MAX_RERUNS and not self.stopping:
            st["rerun_as"] = self.allocate()
            self.save(st)  # before the row: a restart then starts the rerun the row announces
        reason = f"worker {self.lost_worker(n, exc)} lost ({type(exc).__name__}: {one_line(exc, 160)})" + (
            f"; runs again as experiment {st['rerun_as']}" if "rerun_as" in st else "")
        self.finish(st, {"status": "crash", "reason": reason})  # its row as every decision's: tokens, cost

    def lost_worker(self, n: int, exc: Exception) -> str:
        """Which worker died: as it wrote itself into the run folder (this host), else the node Ray names."""
        with contextlib.suppress(OSError):
            return (self.session.runs / str(n) / "worker.txt").read_text().strip()
        ip = re.search(r"\bIP(?: address)?:? ([0-9a-fA-F.:]+[0-9a-fA-F])", str(exc))
        return f"on node {ip.group(1)}" if ip else "(unknown)"

    def start_rerun(self, st: ExperimentState) -> None:
        """The same change on the same parent, as a commit of its own (one ledger row per commit)."""
        m = st["rerun_as"]
        rerun = {key: st[key] for key in ("kind", "parent", "description", "seen") if key in st}
        rerun.update(experiment=m, reruns=st.get("reruns", 0) + 1, commit=self.commit_change(
            m, st["parent"], self.train_py_at(st["commit"]), st["description"]))
        self.submit(rerun)

    def bring_back(self, st: ExperimentState, result: RunResult) -> None:
        """From a host without the driver's disk: the logs into runs/<tag>/<n>/."""
        folder = self.session.runs / str(st["experiment"])
        for name, text in (result.get("logs") or {}).items():
            if text:
                atomic_write(folder / name, text)

    def fetch_submission(self, st: ExperimentState, result: RunResult) -> None:
        """A kept experiment's submission, copied from its host when that host has a disk of its own."""
        local = self.session.runs / str(st["experiment"]) / "submission.pt"
        if not result.get("submission") or Path(result["submission"]) == local:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        strategy = NodeAffinitySchedulingStrategy(node_id=result["node"], soft=False)
        try:
            data = self.ray.get(self.fetch.options(scheduling_strategy=strategy).remote(result["submission"]))
        except self.ray.exceptions.RayError as exc:
            log(f"experiment {st['experiment']}: its submission could not be fetched ({one_line(exc, 150)})")
            return
        if hashlib.sha256(data).hexdigest() != result.get("submission_sha256"):
            log(f"experiment {st['experiment']}: the fetched submission's digest differs from the scored one; not kept")
            return
        atomic_write_bytes(local, data)

    def finish(self, st: ExperimentState, result: RunResult, confirm: RunResult | None = None) -> str:
        """Decide (keep.keep_rule against the best now), write the rows in one write, then move the branch
        or keep the commit under a ref. Idempotent across a kill: a restart finds the row and does the rest."""
        session, n, commit, parent = self.session, st["experiment"], st["commit"], st["parent"]
        tampered = protect_ledger(session)
        rows = session.rows()
        head = self.head()
        status = recorded_status(rows, st)
        if status is None:
            rule = {"strict": self.args.strict, "protocol": night_protocol(self.args)}
            decision = keep_rule(rows, result, confirm, baseline=st["kind"] == "baseline", **rule)
            decision = stale_parent(rows, result, decision, parent, head, confirm, **rule)
            status, reason = decision.status, decision.reason
            if decision.reapply:  # won on a parent that is no longer the best
                st["reapply_as"] = st.get("reapply_as") or self.allocate()
                self.save(st)
                reason = f"{reason}: re-applied on it as experiment {st['reapply_as']}"
            append_rows(session, decision_rows(session, st, result, confirm, status, reason, decision.best,
                                                           tampered))
        if status == "keep":
            if head == parent:  # else a restart finds it already moved
                self.fetch_submission(st, result)
                self.move_branch(st)
        elif st["kind"] != "baseline":
            session.repo.git.update_ref(self.ref(n, "discarded"), commit)
        for key, start in (("reapply_as", self.start_reapply), ("rerun_as", self.start_rerun)):
            if st.get(key) is not None and not self.known(st[key]):
                start(st)
        if st["kind"] != "baseline":
            session.repo.git.update_ref("-d", self.ref(n))
        self.drop_tree(n)
        keep_best_submission(session)
        self.forget(st)
        log(f"experiment {n}: {status}  val_ppl={result.get('val_ppl')}  {one_line(result.get('reason') or '', 150)}")
        return status

    def known(self, n: int) -> bool:
        """Experiment n is in the ledger or in flight (a re-apply already started)."""
        return (self.session.inflight_dir / f"{n}.json").exists() or bool((self.session.rows()["experiment"] == n).any())

    # -------- the night
    def resume(self) -> None:
        """Experiments in flight when the driver stopped: a recorded one is finished, the others run again."""
        states = []
        for path in sorted(self.session.inflight_dir.glob("*.json"), key=lambda p: int(p.stem)):
            try:
                states.append(json.loads(path.read_text()))
            except ValueError:
                log(f"{path}: unreadable (cut by a kill?); set aside")
                path.rename(path.with_suffix(".unreadable"))
        rows = self.session.rows()
        for st in states:  # killed after a rerun or re-apply number was saved, before the row that announces it:
            if "commit" in st and recorded_status(rows, st) is None:  # it runs again as itself: the number is free
                dropped = [st.pop(key) for key in ("rerun_as", "reapply_as") if key in st]
                if dropped:
                    self.save(st)
        self.next_n = max([self.next_n, *[st["experiment"] + 1 for st in states],
                           *[st.get(key, -1) + 1 for st in states for key in ("reapply_as", "rerun_as")]])
        for st in states:
            if st.get("kind") == "redo":  # a stale win's re-proposal, asked for when the driver stopped
                if (self.session.rows()["experiment"] == st["experiment"]).any():
                    self.forget(st)
                else:
                    log(f"resuming experiment {st['experiment']}: asking again for its re-applied change")
                    self.ask(redo={"description": st["description"], "reapplied_from": st.get("reapplied_from")},
                             n=st["experiment"])
                continue
            label = st.get("label", "")
            kill_leftovers(self.session.runs / str(st["experiment"]) / f"child{label}.pid")
            if recorded_status(self.session.rows(), st) is not None:
                self.finish(st, {})
            else:
                log(f"resuming experiment {st['experiment']}: in flight when the driver stopped, running it again")
                self.submit(st, fresh=True)

    def baselines(self) -> None:
        """The reference before any experiment: --baseline-runs runs of the branch's train.py, at once."""
        protocol, failures = night_protocol(self.args), 0
        while not stop_reason(self.session):
            rows = self.session.rows()
            scored = scored_baselines(rows, protocol)
            running = sum(st["kind"] == "baseline" for st in self.flights.values())
            if not running and baseline_complete(rows, protocol, self.args.baseline_runs):
                return
            if failures >= BASELINE_TRIES:
                raise FatalError(baseline_failure(rows, protocol, self.args.tag))
            head = self.head()
            for _ in range(min(self.args.baseline_runs - scored - running, self.slots - len(self.flights))):
                self.submit({"experiment": self.allocate(), "kind": "baseline", "commit": head, "parent": head,
                             "description": baseline_description(rows, protocol, scored + running + 1)})
                running += 1
            for ref in self.wait():
                baseline, n = self.flights[ref]["kind"] == "baseline", self.flights[ref]["experiment"]
                self.collect(ref)
                rows = self.session.rows()
                mine = rows[rows["experiment"] == n]
                if baseline:
                    failures = baseline_failures(failures, mine.iloc[-1] if len(mine) else None, protocol)

    def wait(self) -> list:
        if not self.flights:
            time.sleep(POLL_S)
            return []
        refs = list(self.flights)
        done, _ = self.ray.wait(refs, num_returns=1, timeout=POLL_S)  # back as soon as one ends ...
        if done:  # ... with every other one that has ended too
            done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        return done

    def run(self) -> int:
        self.resume()
        self.baselines()
        while True:
            if not self.stopping:
                self.stopping = budget_left(self.session, 0)
            limit = self.args.max_experiments
            can_ask = not self.stopping and (limit is None or self.started < limit)
            ahead = self.slots if self.args.pipeline else self.slots - len(self.flights)
            while can_ask and len(self.asking) < ahead and (limit is None or self.started < limit):
                self.ask()
            for pending in [p for p in self.asking if not p.is_alive()]:
                if len(self.flights) >= self.slots or self.stopping:
                    break
                self.asking.remove(pending)
                self.dispatch(pending)
            if not self.flights and (self.stopping or (not self.asking and not can_ask)):
                break
            for ref in self.wait():
                self.collect(ref)
        for pending in self.asking:
            abandon(self.session, pending, f"the driver stopped ({self.stopping or 'budget reached'}) before it could run")
            if (self.session.rows()["experiment"] == pending.n).any():
                self.forget({"experiment": pending.n})  # a re-proposal without a row stays for the next start
        log(f"stopping: {self.stopping or f'--max-experiments {self.args.max_experiments} reached'}")
        return 0


def clean(result: RunResult) -> RunResult:
    """The ledger's fields of a worker's result (without the logs it carried back)."""
    return {k: v for k, v in result.items() if k not in ("logs",)}


def run_pool(session: Session) -> int:
    if session.args.proposer == "sweep":
        raise FatalError("--proposer sweep tries one value at a time on top of the last result: run it with "
                         "--workers 1 (an LLM proposer uses every GPU)")
    ray, slots = start_ray(session.args)
    log(f"{slots} workers ({'Ray cluster ' + session.args.ray if session.args.ray else 'a local Ray instance'}); "
        f"experiments run in runs/{session.args.tag}/<n>/tree")
    try:
        return Pool(session, ray, slots).run()
    finally:
        ray.shutdown()
