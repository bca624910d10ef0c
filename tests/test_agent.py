"""agent.py end to end: the real driver process, a real git repo, the real openai client against a
scripted server on 127.0.0.1, stand-in train.py/prepare.py (fast) and one run with the real ones."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import git
import pytest

from driver_helpers import (AGENT, TAG, check_invariants, edit, kill_agent, ledger, processes_in, run_agent,
                            start_agent, state, wait_for_phase)
from fake_llm import FakeLLM


def mode(new: str) -> str:
    return edit('MODE = "ok"', f'MODE = "{new}"', f"train.py misbehaves: {new}")


def head_train_py(repo) -> str:
    return git.Repo(repo).head.commit.tree["train.py"].data_stream.read().decode()


# ---------------------------------------------------------------- keep / discard
def test_keep_then_discard(repo, llm):
    llm.push(edit("PPL = 20.0", "PPL = 18.0", "lower the ppl"), edit("PPL = 18.0", "PPL = 19.0", "raise it"))
    done = run_agent(repo, llm.url, "--max-experiments", "2", "--price-in", "2.5", "--price-out", "10", "--no-pipeline")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "keep", "discard"]
    assert rows["val_ppl"].tolist() == [20.0, 18.0, 19.0]
    assert rows["best_val_ppl"].tolist() == [20.0, 18.0, 18.0]
    assert rows["description"].tolist()[1:] == ["lower the ppl", "raise it"]
    assert (rows["prompt_tokens"][1:] > 0).all() and (rows["cost_usd"][1:] > 0).all()
    assert rows["branch"].unique().tolist() == [f"autoresearch/{TAG}"]
    g = git.Repo(repo)
    assert g.active_branch.name == f"autoresearch/{TAG}"
    assert "PPL = 18.0" in head_train_py(repo) and "PPL = 18.0" in (repo / "train.py").read_text()
    assert g.head.commit.summary == "lower the ppl" and "autoresearch experiment 1" in g.head.commit.message
    discarded = g.commit(f"refs/autoresearch/{TAG}/discarded/2")
    assert "PPL = 19.0" in discarded.tree["train.py"].data_stream.read().decode()
    assert "+PPL = 19.0" in (repo / "runs" / TAG / "2" / "diff.patch").read_text()
    assert (repo / "runs" / TAG / "1" / "submission.pt").exists()  # the best stays
    assert not (repo / "runs" / TAG / "2" / "submission.pt").exists()
    assert check_invariants(repo) == []
    # the prompt carried program.md, the ledger and train.py
    prompt = llm.requests[-1]["messages"][1]["content"]
    assert "NEVER STOP" in prompt and "lower the ppl" in prompt and "PPL = 18.0" in prompt


@pytest.mark.parametrize("pipeline", [False, True], ids=["asked-after", "prefetched-meanwhile"])
def test_a_change_that_remakes_a_scored_train_py_is_not_trained_again(repo, llm, pipeline):
    """The same change twice (a weak model's habit): its score is known, so the LLM is asked for another."""
    worse = edit("PPL = 20.0", "PPL = 21.0", "raise the ppl")
    llm_lower = edit("PPL = 20.0", "PPL = 18.0", "lower the ppl")
    llm.push(worse, worse, llm_lower)
    done = run_agent(repo, llm.url, "--max-experiments", "2", *([] if pipeline else ["--no-pipeline"]))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = ledger(repo)
    assert rows["status"].tolist()[:3] == ["baseline", "discard", "keep"], rows
    assert rows["val_ppl"].tolist()[:3] == [20.0, 21.0, 18.0]
    assert "the same program as the file experiment 1 (discard, val_ppl 21)" in done.stdout
    if not pipeline:  # a repair turn: the LLM is told why
        assert "the same program as the file experiment 1" in llm.requests[2]["messages"][-1]["content"]
    # every reply for experiment 2 is kept, in the order asked, whether it was a repair turn or a fresh ask
    # after a prefetch (a fresh ask once wrote response0.md over the prefetch's)
    folder = repo / "runs" / TAG / "2"
    replies = [folder / f"response{i}.md" for i in range(2)]
    assert [r.read_text() for r in replies] == [worse, llm_lower], replies
    assert sorted(p.name for p in folder.glob("response*.md")) == ["response0.md", "response1.md"]
    assert sorted(p.name for p in folder.glob("prompt*.json")) == ["prompt0.json", "prompt1.json"]
    assert check_invariants(repo) == []


def test_status_subcommand(repo, llm):
    run_agent(repo, llm.url, "--max-experiments", "1")
    done = run_agent(repo, llm.url, "status")
    assert done.returncode == 0 and "baseline val_ppl 20.0000" in done.stdout and "keep 1" in done.stdout


# ---------------------------------------------------------------- train.py faults
@pytest.mark.parametrize("sandboxed", [True, False], ids=["landlock", "unsandboxed"])
def test_train_py_faults_get_the_right_status(repo, llm, sandboxed):
    """Each fault gets its status; what the sandbox blocks is a crash naming the denial, what it cannot
    block (or, unsandboxed, everything) is detected and undone by the driver."""
    denied = ("crash", "Permission denied")
    faults = {"crash": ("crash", "boom"), "hang": ("timeout", "limit"), "orphan": ("timeout", "limit"),
              "nosubmit": ("crash", "without writing a submission"), "nonternary": ("crash", "not ternary"),
              "garbage": ("crash", "not a submission"),
              "tamper": denied if sandboxed else ("crash", "prepare.py was modified"),
              "fake": ("discard", "not lower"), "flood": ("discard", "not lower"),
              "ledger": denied if sandboxed else ("discard", "restored"),
              "oom": ("crash", "out of memory"), "nan": ("crash", "not finite"),
              "rmruns": denied if sandboxed else ("discard", "not lower"),
              "env": ("discard", "not lower")}  # after rmruns: unsandboxed, its dump must survive to be read
    llm.push(*[mode(m) for m in faults])
    done = run_agent(repo, llm.url, "--max-experiments", str(len(faults)), "--timeout", "5", "--max-failures", "99",
                     "--sandbox", "auto" if sandboxed else "off", timeout=300,
                     AR_TEST_KILL_GRACE_S="1")  # the orphan ignores SIGTERM: 1 s, then SIGKILL
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = ledger(repo)
    assert len(rows) == len(faults) + 1
    for (name, (status, reason)), (_, row) in zip(faults.items(), rows.iloc[1:].iterrows()):
        assert row["status"] == status and reason in row["reason"], (name, row.to_dict())
    scored = sum(status == "discard" for status, _ in faults.values())
    assert rows.iloc[1:]["val_ppl"].dropna().tolist() == [20.0] * scored  # the fake print did not count
    assert "sandbox: Landlock ABI" in (repo / "runs" / TAG / "1" / "train.log").read_text() if sandboxed \
        else "unsandboxed" in rows.iloc[1]["reason"]
    assert processes_in(repo) == []
    if sandboxed:  # unsandboxed, the rmruns fault deleted runs/ with this log
        orphan = (repo / "runs" / TAG / "3" / "train.log").read_text().split("orphan pid ")[1].split()[0]
        assert not _alive(int(orphan))
    dumped = (repo / "runs" / TAG / str(len(faults)) / "train.log").read_text()  # secrets stripped, either way
    assert "sk-test-secret-key" not in dumped and "hf_test_token" not in dumped and "AR_DEADLINE=" in dumped
    assert "SSH_AUTH_SOCK" not in dumped
    assert "# tampered" not in (repo / "prepare.py").read_text()
    problems = check_invariants(repo)
    if sandboxed:
        assert problems == []
    else:  # runs/ was deleted by the rmruns experiment: the logs before it are gone, everything else holds
        assert problems and all("has no diff in runs/" in p for p in problems), problems


def test_output_flood_is_capped_in_the_log(repo, llm):
    llm.push(mode("flood"))
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout
    log = repo / "runs" / TAG / "1" / "train.log"
    assert 1_000_000 < log.stat().st_size < 2_100_000  # 20 MB written: the head and the tail are kept
    assert "bytes of output dropped" in log.read_text() and ledger(repo).iloc[-1]["status"] == "discard"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return open(f"/proc/{pid}/stat").read().split()[2] != "Z"


# ---------------------------------------------------------------- replies
def test_bad_reply_is_repaired_in_a_second_turn(repo, llm):
    llm.push("I think we should lower the learning rate.", edit("PPL = 20.0", "PPL = 17.0"))
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout
    assert ledger(repo)["status"].tolist() == ["baseline", "keep"]
    repair = llm.requests[1]["messages"]
    assert repair[-2]["role"] == "assistant" and "no SEARCH/REPLACE block" in repair[-1]["content"]


def test_three_bad_replies_make_an_invalid_row_and_nothing_runs(repo, llm):
    bad = edit("PPL = 99.0", "PPL = 1.0")
    llm.push(bad, bad, bad)
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0
    row = ledger(repo).iloc[-1]
    assert row["status"] == "invalid" and "SEARCH text not found" in row["reason"] and "closest lines" in row["reason"]
    assert not (repo / "runs" / TAG / "1" / "train.log").exists()
    assert len(list(git.Repo(repo).iter_commits())) == 1 and check_invariants(repo) == []


def test_consecutive_failures_stop_the_driver(repo, llm):
    llm.push(*["no edit here"] * 9)
    done = run_agent(repo, llm.url, "--max-failures", "3")
    assert done.returncode == 0 and "3 failed experiments in a row" in done.stdout
    assert ledger(repo)["status"].tolist() == ["baseline", "invalid", "invalid", "invalid"]


# ---------------------------------------------------------------- the LLM endpoint
def test_transient_api_faults_are_waited_out(repo, llm):
    llm.push({"status": 429, "headers": {"Retry-After": "1"}}, {"status": 429}, {"status": 500}, {"status": 503},
             {"reset": True}, {"body": b"this is not json"}, {"choices": []}, {"hang": 8},
             edit("PPL = 20.0", "PPL = 15.0"))
    done = run_agent(repo, llm.url, "--max-experiments", "1", "--llm-timeout", "2", timeout=240)
    assert done.returncode == 0, done.stdout
    assert ledger(repo)["status"].tolist() == ["baseline", "keep"]
    assert "LLM endpoint unavailable" in done.stdout


def test_model_not_found_stops_with_a_clear_message(repo, llm):
    llm.push({"status": 404, "body": b'{"error": {"message": "The model fake does not exist", "code": "model_not_found"}}'})
    done = run_agent(repo, llm.url, "--max-experiments", "3")
    assert done.returncode == 2 and "NotFoundError" in done.stdout and "--model" in done.stdout
    assert ledger(repo)["status"].tolist() == ["baseline"]


def test_connection_refused_until_the_server_comes_up(repo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_agent(repo, f"http://127.0.0.1:{port}/v1", "--max-experiments", "1")
    wait_for_phase(repo, "llm", experiment=1)
    time.sleep(3)
    server = FakeLLM(port=port)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        server.close()
    assert proc.returncode == 0, out
    assert "APIConnectionError" in out and ledger(repo)["status"].tolist() == ["baseline", "keep"]


def test_no_endpoint_configured_stops_at_once(repo):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    done = subprocess.run([sys.executable, str(AGENT), "--repo", str(repo), "--proposer", "llm"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "set OPENAI_API_KEY" in done.stdout
    assert not (repo / "results.tsv").exists()


# ---------------------------------------------------------------- setup
def test_refuses_uncommitted_train_py(repo, llm):
    (repo / "train.py").write_text((repo / "train.py").read_text() + "\n# my own edit\n")
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 2 and "uncommitted changes to train.py" in done.stdout and "git stash" in done.stdout
    assert "# my own edit" in (repo / "train.py").read_text()


# ---------------------------------------------------------------- stop and resume
def test_stop_file_stops_after_the_current_experiment(repo, llm):
    llm.push(edit("SLEEP_S = 0.0", "SLEEP_S = 2.0", "slow"))
    proc = start_agent(repo, llm.url)
    wait_for_phase(repo, "training", experiment=1)
    (repo / "runs" / TAG / "STOP").touch()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "STOP file" in out
    rows = ledger(repo)
    assert rows["experiment"].tolist() == [0, 1, 2]
    # experiment 2 was asked for while 1 trained and will never run: its LLM call is billed all the same
    assert rows.iloc[2]["status"] == "invalid" and rows.iloc[2]["reason"].startswith("not run: the driver stopped")
    assert billed(repo) == served(llm) and len(llm.usage) == 2


def slow_and_better(seconds: float, ppl: float, description: str = "slow") -> str:
    return (edit("SLEEP_S = 0.0", f"SLEEP_S = {seconds}", description)
            + edit("PPL = 20.0", f"PPL = {ppl}").split("\n", 1)[1])


def test_ctrl_c_once_finishes_twice_stops_now(repo, llm):
    llm.push(slow_and_better(3.0, 19.0))
    proc = start_agent(repo, llm.url)
    wait_for_phase(repo, "training", experiment=1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    # experiment 2, asked for while 1 trained, never runs: an `invalid` row bills its LLM call
    assert proc.returncode == 0 and ledger(repo)["status"].tolist() == ["baseline", "keep", "invalid"]

    llm.push(edit("SLEEP_S = 3.0", "SLEEP_S = 30.0", "slower"))  # on top of the kept experiment 1
    proc = start_agent(repo, llm.url)
    wait_for_phase(repo, "training", experiment=3)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "resume" in out
    assert processes_in(repo) == [] and state(repo)["phase"] == "training"
    # experiment 4, asked for while 3 trained, is billed though it never runs (3's row comes when it is resumed)
    last = ledger(repo).iloc[-1]
    assert last["experiment"] == 4 and last["reason"].startswith("not run") and \
        (last["prompt_tokens"], last["completion_tokens"]) == llm.usage[-1]


@pytest.mark.parametrize("phase", ["llm", "applying", "committed", "training", "training-live", "scoring", "recorded"])
def test_killed_in_any_phase_resumes_without_loss(baseline_repo, llm, phase):
    """SIGKILL the driver in each phase (held there by AR_TEST_PAUSE; 'training-live' kills it while
    a real train.py runs), restart it: one row per experiment, no LLM call wasted, nothing left running."""
    repo = baseline_repo
    idea = slow_and_better(3.0 if phase == "training-live" else 0.5, 19.0, "the idea")
    llm.push({"hang": 30} if phase == "llm" else idea)
    pause = {} if phase == "training-live" else {"AR_TEST_PAUSE": f"{phase}:30"}
    proc = start_agent(repo, llm.url, "--max-experiments", "1", **pause)
    wait_for_phase(repo, phase.replace("-live", ""), experiment=1)
    if phase == "training-live":
        time.sleep(1.5)
        assert processes_in(repo), "train.py should be running when the driver is killed"
    requests_before = len(llm.requests)
    kill_agent(proc)
    if phase == "llm":
        llm.push(idea)
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout
    rows = ledger(repo)
    assert rows["experiment"].tolist() == [0, 1], rows
    assert rows.iloc[1]["description"] == "the idea" and rows.iloc[1]["status"] == "keep", rows.iloc[1].to_dict()
    if phase != "llm":
        assert len(llm.requests) == requests_before  # the LLM call was not wasted
    assert processes_in(repo) == [] and check_invariants(repo) == []


def test_cost_and_hour_budgets_stop_the_driver(repo, llm):
    done = run_agent(repo, llm.url, "--max-cost", "0.001", "--price-in", "1000", "--price-out", "1000")
    assert done.returncode == 0 and "--max-cost 0.001 reached" in done.stdout
    rows = ledger(repo)
    assert len(rows) == 3 and rows["cost_usd"].iloc[1] >= 0.001  # the first proposal spent the budget
    assert rows.iloc[2]["reason"].startswith("not run") and rows["cost_usd"].iloc[2] > 0  # the prefetch is billed
    # 36 ms, checked before each experiment: start-up may be quicker than that, so at most one more runs
    done = run_agent(repo, llm.url, "--max-hours", "0.00001")
    assert done.returncode == 0 and "--max-hours 1e-05 reached" in done.stdout and len(ledger(repo)) in (3, 4)


# ---------------------------------------------------------------- the endpoint's limits and refusals
def billed(repo) -> tuple[int, int]:
    rows = ledger(repo)
    return int(rows["prompt_tokens"].fillna(0).sum()), int(rows["completion_tokens"].fillna(0).sum())


def served(llm) -> tuple[int, int]:
    return sum(p for p, _ in llm.usage), sum(c for _, c in llm.usage)


@pytest.mark.parametrize("status, body, says", [
    (409, b'{"error": {"message": "conflict"}}', "ConflictError 409"),
    (422, b'{"error": {"message": "unprocessable"}}', "UnprocessableEntityError 422"),
    (429, b'{"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}}', "quota"),
    (402, b'{"error": {"message": "insufficient credits"}}', "402"),
])
def test_permanent_api_refusals_stop_the_night_with_a_clear_message(repo, status, body, says):
    llm = FakeLLM([{"status": status, "body": body}] * 20)
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "1", timeout=90)
    finally:
        llm.close()
    assert done.returncode == 2 and says in done.stdout, done.stdout[-2000:]
    assert len(llm.requests) <= 3  # the openai client's own retries at most, never a retry loop
    assert ledger(repo)["status"].tolist() == ["baseline"]


def test_a_refusal_during_a_repair_turn_still_bills_the_answered_call(repo, llm):
    llm.push("no edit here", *[{"status": 409, "body": b'{"error": {"message": "conflict"}}'}] * 3)  # the client retries twice
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 2 and "ConflictError 409" in done.stdout, done.stdout[-2000:]
    row = ledger(repo).iloc[-1]
    assert row["status"] == "invalid" and row["reason"].startswith("not run") and billed(repo) == served(llm)


def test_an_outage_ends_at_max_hours(repo):
    llm = FakeLLM([{"status": 503}] * 1000)
    try:
        done = run_agent(repo, llm.url, "--max-hours", "0.005", timeout=120)  # 18 s, the baseline takes ~2
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout[-2000:]
    assert "LLM endpoint unavailable" in done.stdout and "--max-hours 0.005 reached while the LLM endpoint" in done.stdout


def test_an_outage_ends_at_a_stop_request(baseline_repo):
    repo = baseline_repo
    llm = FakeLLM([{"status": 503}] * 1000)
    try:
        proc = start_agent(repo, llm.url)
        wait_for_phase(repo, "llm", experiment=1)
        while len(llm.requests) < 2:  # the outage is under way
            time.sleep(0.05)
        (repo / "runs" / TAG / "STOP").touch()
        out, _ = proc.communicate(timeout=60)
    finally:
        llm.close()
    assert proc.returncode == 0 and "stop requested while the LLM endpoint was unavailable" in out, out[-2000:]


HUGE_BAD_REPLY = "I think we should lower the learning rate, and here is why. " * 340  # ~20k chars, no block


@pytest.mark.parametrize("told_by", ["props", "models", "flag"])
def test_the_prompt_is_fitted_to_the_servers_context(repo, told_by):
    """The server's context (llama.cpp /props, vLLM's max_model_len, or --context) budgets every request:
    the repair turn drops the long rejected reply instead of overflowing, max_tokens is capped."""
    n_ctx = 5000
    llm = FakeLLM([HUGE_BAD_REPLY, edit("PPL = 20.0", "PPL = 17.0")], n_ctx=n_ctx, props=told_by == "props",
                  models_meta={"max_model_len": n_ctx} if told_by == "models" else None)
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "1", *(["--context", str(n_ctx)] if told_by == "flag" else []))
    finally:
        llm.close()
    assert done.returncode == 0 and f"LLM context window: {n_ctx} tokens" in done.stdout, done.stdout[-3000:]
    assert ledger(repo)["status"].tolist() == ["baseline", "keep"] and llm.overflows == 0
    repair = llm.requests[1]
    assert all(HUGE_BAD_REPLY[:200] not in (m["content"] or "") for m in repair["messages"])
    assert "no SEARCH/REPLACE block" in repair["messages"][-1]["content"]
    for request in llm.requests:
        prompt = sum(len(m["content"]) for m in request["messages"]) / llm.chars_per_token
        assert prompt + request["max_tokens"] <= n_ctx


def test_context_overflow_shrinks_and_retries_once(repo, llm):
    """The server does not say its context: the long repair turn is refused like llama.cpp refuses it, the
    driver learns n_ctx from the error, shrinks the prompt and asks again."""
    llm.n_ctx = 5000
    llm.push(HUGE_BAD_REPLY, edit("PPL = 20.0", "PPL = 17.0"))
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0 and "context window: unknown" in done.stdout, done.stdout[-3000:]
    assert ledger(repo)["status"].tolist() == ["baseline", "keep"] and llm.overflows == 1
    # the default max_tokens is room for a whole new train.py, not 8192
    train_py = head_train_py(repo).replace("PPL = 17.0", "PPL = 20.0")
    assert llm.requests[0]["max_tokens"] == int(-(-len(train_py) // 3) * 1.3) + 512 < 8192


@pytest.mark.parametrize("body", [None, b'{"error": {"message": "This model\'s maximum context length is 500 tokens. '
                                        b'However, your messages resulted in 3000 tokens", "code": "context_length_exceeded"}}'])
def test_a_context_too_small_gives_invalid_rows_never_a_stop(repo, llm, body):
    llm.n_ctx = 500  # smaller than program.md alone
    llm.overflow_body = body  # llama.cpp's (None), or OpenAI's / vLLM's wording
    done = run_agent(repo, llm.url, "--max-failures", "2")
    assert done.returncode == 0 and "2 failed experiments in a row" in done.stdout, done.stdout[-3000:]
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "invalid", "invalid"]
    assert rows["reason"].str.contains("does not fit the LLM's context even shrunk").sum() == 2
    assert llm.overflows == 4  # each experiment: asked, shrunk and asked once more


def test_the_committed_train_py_is_the_proposal_byte_for_byte(repo, llm):
    """A JSON reply's strings may carry carriage returns: the file committed and run is the one the edit made, not
    a copy with its line ends rewritten (it was read back with read_text), and the next change is made on it."""
    reply = {"description": "lower the ppl", "edits": [{"search": "PPL = 20.0", "replace": "PPL = 18.0\r\n# why\r"}]}
    then = {"description": "fake a score", "edits": [{"search": 'MODE = "ok"', "replace": 'MODE = "fake"'}]}
    llm.push(json.dumps(reply), json.dumps(then))
    done = run_agent(repo, llm.url, "--max-experiments", "2", "--reply-format", "json", "--no-pipeline")
    assert done.returncode == 0, done.stdout[-3000:]
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "keep", "discard"], rows
    g = git.Repo(repo)
    for _, row in rows.iloc[1:].iterrows():
        committed = g.commit(row["commit"]).tree["train.py"].data_stream.read()
        assert b"PPL = 18.0\r\n# why\r" in committed, row["experiment"]
        assert committed == (repo / "runs" / TAG / str(row["experiment"]) / "proposed_train.py").read_bytes()


def test_json_nulls_and_a_choice_without_a_message_are_invalid_rows(repo, llm):
    llm.push('{"description": "x", "edits": [{"search": null, "replace": "PPL = 1.0"}]}',
             '{"description": "x", "edits": [{"search": "PPL = 20.0", "replace": null}]}',
             {"choices": [{"index": 0, "finish_reason": "stop"}]})
    done = run_agent(repo, llm.url, "--max-experiments", "1", "--reply-format", "json")
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stdout[-3000:]
    row = ledger(repo).iloc[-1]
    assert row["status"] == "invalid" and "empty" in row["reason"] and row["prompt_tokens"] > 0
