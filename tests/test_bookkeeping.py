"""Issue 12's bookkeeping: decisions, baselines, protocols, the ledger under faults, stopping, the morning after.
The real driver against stand-in train.py/prepare.py and a scripted OpenAI server (see test_agent.py)."""
import os
import signal
import subprocess
import sys

import git
import pytest

import agent
from driver.common import FatalError
from driver.keep import best_kept
from driver.ledger import read_ledger
from driver.session import open_session
from driver.checkout import commit_train_py
from driver.record import append_row
from driver.experiment import finish_experiment
import prepare
from driver_helpers import (AGENT, TAG, agent_env, check_invariants, edit, held_in, kill_agent, ledger, release,
                            run_agent, start_agent, state, wait_for_phase)
from fake_llm import FakeLLM


def ppl(old: str, new: str, description: str = "a change") -> str:
    return edit(f"PPL = {old}", f"PPL = {new}", description)


def bare_agent(repo, *args: str) -> subprocess.CompletedProcess:
    """agent.py without the helpers' --tag (report/plot/status pick their own)."""
    return subprocess.run([sys.executable, str(AGENT), *args, "--repo", str(repo)], env=agent_env(),
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- item 1: the rows of one decision land together
def test_a_kill_after_the_first_flush_leaves_both_rows_of_a_confirmed_decision_or_none(repo, monkeypatch):
    session = open_session(agent.parse_args(["--repo", str(repo), "--tag", TAG]))
    session.repo.git.checkout("-b", session.branch)
    head = session.repo.head.commit.hexsha
    for n, value in enumerate((20.5, 19.5)):  # σ 0.707: a gain of 0.8 is marginal
        append_row(session, {"experiment": n, "branch": session.branch, "commit": head, "parent": head,
                                   "status": "baseline", "val_ppl": value, "protocol": "v1", "description": "baseline"})
    (repo / "train.py").write_text((repo / "train.py").read_text().replace("PPL = 20.0", "PPL = 19.2"))
    commit = commit_train_py(session, "lucky")
    st = {"experiment": 2, "kind": "proposal", "commit": commit, "parent": head, "description": "lucky"}
    lucky, unlucky = {"val_ppl": 19.2, "protocol": "v1"}, {"val_ppl": 20.9, "protocol": "v1"}
    close = os.close

    def killed(fd):  # the driver dies right after its first write to the ledger is done (written, fsynced, closed)
        ledger_fd = os.readlink(f"/proc/self/fd/{fd}") == str(session.ledger)  # not the state saved before the rows
        close(fd)
        if ledger_fd:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "close", killed)
    with pytest.raises(KeyboardInterrupt):
        finish_experiment(session, st, lucky, unlucky)
    monkeypatch.setattr(os, "close", close)
    rows = read_ledger(session.ledger)
    # the kill came after the one write of both rows (never the lucky run alone, never a kill before any row)
    assert rows[rows["experiment"] == 2]["val_ppl"].tolist() == [19.2, 20.9], rows
    finish_experiment(session, st, lucky, unlucky)  # resume finishes the decision, once
    rows = read_ledger(session.ledger)
    assert rows["status"].tolist() == ["baseline", "baseline", "discard", "discard"]
    assert rows["best_val_ppl"].tolist()[-2:] == [20.0, 20.0] and best_kept(rows) == 20.0


# ---------------------------------------------------------------- item 2: baselines that do not score
def test_a_crashed_baseline_is_run_again_and_is_no_reference(repo, llm):
    (repo / "evalfail.txt").write_text("1")
    llm.push(ppl("20.0", "500.0", "25 times worse"))
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout
    rows = ledger(repo)
    assert rows["status"].tolist() == ["crash", "baseline", "discard"], rows
    assert "scripted evaluator failure" in rows["reason"].iloc[0]
    assert rows["best_val_ppl"].tolist()[1:] == [20.0, 20.0] and check_invariants(repo) == []


def test_a_baseline_that_never_scores_stops_the_night_saying_why(repo, llm):
    (repo / "evalfail.txt").write_text("9")
    done = run_agent(repo, llm.url, "--max-experiments", "3")
    assert done.returncode == 2, done.stdout
    assert "did not score" in done.stdout and "in 3 tries" in done.stdout and "scripted evaluator failure" in done.stdout
    assert ledger(repo)["status"].tolist() == ["crash"] * 3 and llm.requests == []


# ---------------------------------------------------------------- item 3: protocols
def test_smoke_scores_are_never_compared_with_full_ones(repo, llm):
    done = run_agent(repo, llm.url, "--max-experiments", "0", "--eval-windows", "2")  # a daytime smoke run: 10.0
    assert done.returncode == 0, done.stdout
    llm.push(ppl("20.0", "19.0", "better under the full protocol"))
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "baseline", "keep"], rows
    assert rows["protocol"].tolist() == ["v1-smoke2w", "v1", "v1"] and rows["val_ppl"].tolist() == [10.0, 20.0, 19.0]
    assert "protocol v1)" in rows["reason"].iloc[2] and rows["best_val_ppl"].iloc[2] == 19.0
    assert "experiment\tstatus\tval_ppl\tprotocol" in llm.requests[-1]["messages"][1]["content"]
    report = run_agent(repo, llm.url, "report").stdout
    assert "protocol v1: every score below (rows under v1-smoke2w (1 scored) are not compared" in report
    assert "baseline val_ppl 20.0000; best 19.0000" in report
    assert check_invariants(repo) == []


# ---------------------------------------------------------------- item 4: a kill inside discard()
@pytest.mark.parametrize("phase", ["recorded", "discarding"])
def test_a_kill_while_discarding_resumes_cleanly(baseline_repo, llm, phase):
    repo = baseline_repo
    parent = git.Repo(repo).head.commit.hexsha
    llm.push(ppl("20.0", "21.0", "worse"))
    proc = start_agent(repo, llm.url, "--max-experiments", "1", AR_TEST_PAUSE=f"{phase}:30")
    wait_for_phase(repo, phase, experiment=1)
    kill_agent(proc)
    if phase == "discarding":  # the kill lands between the driver's reset and its checkout of train.py
        git.Repo(repo).git.reset("--soft", parent)
    done = run_agent(repo, llm.url, "--max-experiments", "0")
    assert done.returncode == 0, done.stdout
    g = git.Repo(repo)
    assert g.head.commit.hexsha == parent and not g.is_dirty(path="train.py")
    assert ledger(repo)["status"].tolist() == ["baseline", "discard"] and check_invariants(repo) == []


# ---------------------------------------------------------------- items 6, 7, 8: the ledger under faults
def test_a_ledger_overwritten_by_train_py_is_restored_without_a_traceback(repo, llm):
    """Unsandboxed (in the sandbox, the write is refused: test_agent's faults test)."""
    llm.push(edit('MODE = "ok"', 'MODE = "vandal"', "overwrite the ledger"))
    done = run_agent(repo, llm.url, "--max-experiments", "1", "--sandbox", "off")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "discard"] and "restored" in rows["reason"].iloc[1]
    assert check_invariants(repo) == []


def test_a_restart_never_copies_a_ledger_that_lost_rows_over_the_drivers_copy(repo, llm):
    run_agent(repo, llm.url, "--max-experiments", "1")
    before = (repo / "results.tsv").read_text()
    (repo / "results.tsv").write_text("not\ta ledger\n1\t2\n")  # e.g. a run's vandalism, then a kill before the restore
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lost rows" in done.stdout
    assert (repo / "results.tsv").read_text().startswith(before) and ledger(repo)["experiment"].tolist() == [0, 1, 2]
    assert [p.read_text() for p in repo.glob("results.tsv.lost-rows-*")] == ["not\ta ledger\n1\t2\n"]
    assert check_invariants(repo) == []


def test_a_missing_ledger_is_restored_and_numbering_continues(repo, llm):
    run_agent(repo, llm.url, "--max-experiments", "1")
    first_diff = (repo / "runs" / TAG / "1" / "diff.patch").read_text()
    (repo / "results.tsv").unlink()
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restored its 2 rows" in done.stdout
    assert ledger(repo)["experiment"].tolist() == [0, 1, 2]
    assert (repo / "runs" / TAG / "1" / "diff.patch").read_text() == first_diff and check_invariants(repo) == []


def test_a_last_row_without_its_newline_is_taken_and_nothing_is_glued(repo, llm):
    run_agent(repo, llm.url, "--max-experiments", "1")
    path = repo / "results.tsv"
    path.write_text(path.read_text().rstrip("\n"))  # as a spreadsheet saves it
    assert bare_agent(repo, "status").returncode == 0
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ledger(repo)["experiment"].tolist() == [0, 1, 2] and check_invariants(repo) == []


def test_a_last_row_cut_by_a_kill_is_dropped_with_a_log_line(repo, llm):
    run_agent(repo, llm.url, "--max-experiments", "1")
    path = repo / "results.tsv"
    path.write_text(path.read_text() + "2\t2026-11-27T01:00:00+00:00\tautoresearch/t\tabc")  # half a row
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dropped a last row cut short" in done.stdout
    assert ledger(repo)["experiment"].tolist() == [0, 1, 2] and check_invariants(repo) == []


def test_appending_after_a_missing_newline_never_glues_two_rows(tmp_path):
    path = tmp_path / "results.tsv"
    prepare.append_ledger_row({"experiment": 0, "status": "baseline", "val_ppl": 20.0}, path)
    path.write_text(path.read_text().rstrip("\n"))
    prepare.append_ledger_row({"experiment": 1, "status": "keep", "val_ppl": 19.0}, path)
    assert read_ledger(path)["val_ppl"].tolist() == [20.0, 19.0]
    path.write_text(path.read_text() + "2\t2026-11-27T01:00:00+00:00\tautoresearch/t")  # a manual run cut by a kill
    prepare.append_ledger_row({"experiment": 3, "status": "keep", "val_ppl": 18.0}, path)
    assert path.read_text().splitlines()[3:] == ["2\t2026-11-27T01:00:00+00:00\tautoresearch/t", "3\t\t\t\t\tkeep\t\t18.0"
                                                 + "\t" * (len(prepare.LEDGER_COLUMNS) - 8)]
    with pytest.raises(FatalError, match="line 4 is malformed .3 fields where the header has"):
        read_ledger(path)  # never a row left out silently: test_trust_ledger.py


# ---------------------------------------------------------------- items 9, 10, 11: stopping and budgets
def test_a_restart_after_max_failures_runs_again(repo, llm):
    llm.push("no edit here", "no edit here")
    done = run_agent(repo, llm.url, "--max-failures", "2", "--repair-turns", "0")
    assert done.returncode == 0 and "2 failed experiments in a row" in done.stdout
    done = run_agent(repo, llm.url, "--max-failures", "2", "--repair-turns", "0", "--max-experiments", "1")
    assert done.returncode == 0, done.stdout
    assert ledger(repo)["status"].tolist() == ["baseline", "invalid", "invalid", "keep"]


def test_max_cost_without_prices_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        agent.parse_args(["--max-cost", "5"])
    assert exit_.value.code == 2 and "--max-cost needs --price-in and --price-out" in capsys.readouterr().err
    assert agent.parse_args(["--max-cost", "5", "--price-in", "0", "--price-out", "0"]).max_cost == 5


@pytest.mark.parametrize("how", ["STOP", "Ctrl-C"])
def test_stop_requests_are_honoured_between_baseline_runs(repo, llm, how, tmp_path):
    proc = start_agent(repo, llm.url, "--baseline-runs", "2", AR_TEST_PAUSE=held_in("training", tmp_path))
    wait_for_phase(repo, "training", experiment=0)
    if how == "STOP":
        (repo / "runs" / TAG / "STOP").touch()
    else:
        proc.send_signal(signal.SIGINT)
    release(tmp_path, 0)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert ledger(repo)["status"].tolist() == ["baseline"] and llm.requests == []
    assert ("STOP file found" if how == "STOP" else "interrupted (Ctrl-C)") in out


# ---------------------------------------------------------------- items 17, 18: the morning after
def test_report_plot_and_status_default_to_the_night_just_run(repo, llm):
    run_agent(repo, llm.url, "--max-experiments", "1")
    status = bare_agent(repo, "status")  # on the night's branch
    assert status.returncode == 0 and f"branch autoresearch/{TAG}: 2 experiments" in status.stdout, status.stdout
    git.Repo(repo).git.checkout("main")  # elsewhere: the newest tag with rows
    report = bare_agent(repo, "report")
    assert report.returncode == 0 and f"# autoresearch/{TAG}" in report.stdout and "best 18.0000" in report.stdout
    assert bare_agent(repo, "plot").returncode == 0 and (repo / "progress.png").exists()


def test_the_report_scores_the_baseline_on_test_when_it_is_still_the_best(repo, llm):
    llm.default_factor = 1.1
    done = run_agent(repo, llm.url, "--max-experiments", "1", "--baseline-runs", "2")
    assert done.returncode == 0, done.stdout
    assert ledger(repo)["status"].tolist() == ["baseline", "baseline", "discard"]
    report = run_agent(repo, llm.url, "report")
    # the stand-in scores the test split TEST_SPLIT_FACTOR (1.25) worse: the baseline's test score, not validation's
    assert "test_ppl 25.0000" in report.stdout, report.stdout
    assert check_invariants(repo) == []


# ---------------------------------------------------------------- the default combination, and kills in its phases
def test_pipelining_with_two_baselines_and_confirmation_runs(repo):
    (repo / "jitter.txt").write_text("0.5 -0.5")  # baselines 20.5 and 19.5: σ 0.707, a gain under 1.41 is marginal
    factors = iter([0.97, 0.99, 1.01, 1.01])
    llm = FakeLLM(default_factor=lambda: next(factors), alternate=True)
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "3", "--baseline-runs", "2")
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "baseline", "keep", "keep", "keep", "keep", "discard"], rows
    assert rows["description"].str.startswith("confirmation run: ").tolist() == [False] * 3 + [True, False, True, False]
    assert rows["best_val_ppl"].tolist() == pytest.approx([20.5, 20.0, 19.4, 19.4, 19.206, 19.206, 19.206])
    assert any("# in flight" in r["messages"][1]["content"] for r in llm.requests)  # it was pipelined
    assert "within 2 noise widths" in rows["reason"].iloc[4] and check_invariants(repo) == []


def test_a_kill_while_confirming_resumes_the_confirmation(repo, llm):
    (repo / "jitter.txt").write_text("0.5 -0.5")
    run_agent(repo, llm.url, "--max-experiments", "0", "--baseline-runs", "2")
    llm.push(ppl("20.0", "19.4", "marginal"))
    proc = start_agent(repo, llm.url, "--max-experiments", "1", "--baseline-runs", "2", "--no-pipeline",
                       AR_TEST_PAUSE="confirming:30")
    wait_for_phase(repo, "confirming", experiment=2)
    requests = len(llm.requests)
    kill_agent(proc)
    done = run_agent(repo, llm.url, "--max-experiments", "1", "--baseline-runs", "2", "--no-pipeline")
    assert done.returncode == 0, done.stdout
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "baseline", "keep", "keep"]
    assert rows["description"].tolist()[2:4] == ["marginal", "confirmation run: marginal"]
    assert rows["best_val_ppl"].iloc[2] == pytest.approx(19.4) and len(llm.requests) == requests
    assert check_invariants(repo) == []


@pytest.mark.parametrize("phase", ["training", "scoring"])
def test_a_kill_between_baseline_runs_resumes_them(repo, llm, phase):
    proc = start_agent(repo, llm.url, "--max-experiments", "0", "--baseline-runs", "2", AR_TEST_PAUSE=f"{phase}:30")
    wait_for_phase(repo, phase, experiment=0)
    kill_agent(proc)
    done = run_agent(repo, llm.url, "--max-experiments", "0", "--baseline-runs", "2")
    assert done.returncode == 0, done.stdout
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "baseline"] and rows["experiment"].tolist() == [0, 1]
    assert state(repo)["phase"] == "done" and check_invariants(repo) == []
