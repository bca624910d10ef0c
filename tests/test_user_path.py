"""The user's path, as the README writes it: the whole tool copied into a fresh clone and run from its own
folder with the real prepare.py and train.py on the tiny model; `python prepare.py`, `python train.py` and
`prepare.py eval --split test` by hand; `--reply-format grammar` against the real llama.cpp server; one
step of the sweep over the real program.md's search space.

train.py stops after a few steps (MAX_STEPS: the same short run however loaded the machine), except where the
stock constants are the point or a run must last (a reply fits inside it); everything else is the shipped code."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import git
import pandas as pd
import pytest

from driver.common import ReplyError
from driver.knobs import find_knobs
from driver.edits import parse_reply
from driver.llm import REPLY_GRAMMAR
from driver.sweep import search_space, sweep_next
from conftest import patch_constants
from driver_helpers import ROOT, edit, ledger, make_research_repo, run_agent
from fake_llm import FakeLLM
from test_llamacpp import llama_server, use_short_program  # noqa: F401  (a fixture)

TOOL = ("agent.py", *(f"driver/{p.name}" for p in sorted((ROOT / "driver").glob("*.py"))), "sandbox.py", "prepare.py",
        "train.py", "program.md", ".gitignore")
TIMEOUT_S = 60  # train.py's limit; it submits after its MAX_STEPS, long before
QUICK = dict(BATCH_SIZE=2, SEQ_LEN=128, LOG_EVERY_S=1.0, MAX_STEPS=3)
LLM_DELAY_S = 3.0  # each reply of the scripted LLM takes this long: the prefetch spans part of a real run
# runs that train 4 s, however fast the machine, so that a 3 s reply fits inside one
OVERLAPPED = dict(QUICK, MAX_STEPS=None, EXPORT_RESERVE_S=TIMEOUT_S - 4.0)


def tool_clone(path: Path, constants: dict | None = QUICK) -> Path:
    """A user's clone: the tool's files committed in a fresh git repository, train.py with `constants` set."""
    path.mkdir(parents=True)
    (path / "driver").mkdir()
    for name in TOOL:
        shutil.copy(ROOT / name, path / name)
    if constants:
        patch_constants(path / "train.py", **constants)
    repo = git.Repo.init(path, initial_branch="main")
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "user").set_value("user", "email", "user@example.com")
    repo.index.add(list(TOOL))
    repo.index.commit("ternary-autoresearch")
    return path


def user_env(tiny_env: dict, **extra: str) -> dict:
    """The user's shell: the tiny model and data, no LLM configured unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update({k: v for k, v in tiny_env.items() if k != "AR_SUBMISSION"}, **extra)
    env.pop("AR_SUBMISSION", None)
    return env


def python(clone: Path, env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)


def constant_edit(train_py: str, name: str, value: str, description: str) -> str:
    """A SEARCH/REPLACE reply that sets one of the real train.py's constants (its comment kept)."""
    [line] = [ln for ln in train_py.splitlines() if ln.startswith(f"{name} = ")]
    old = line.split("#")[0].split("=", 1)[1].strip()
    return edit(line, line.replace(f"= {old}", f"= {value}", 1), description)


# ---------------------------------------------------------------- python agent.py, with only an endpoint
def test_agent_with_only_an_endpoint_from_its_own_folder(tiny_env, tmp_path):
    """No --repo, no --tag (today's date), two baseline runs, pipelining on: the next proposal is asked for
    while an experiment trains, and its row says it had not seen that experiment's result."""
    clone = tool_clone(tmp_path / "ternary-autoresearch", OVERLAPPED)
    train_py = (clone / "train.py").read_text()
    replies = [constant_edit(train_py, "LR", "2e-4", "a lower learning rate"),
               constant_edit(train_py, "WEIGHT_DECAY", "0.01", "some weight decay")]
    llm = FakeLLM(latency=LLM_DELAY_S)
    llm.default_reply = lambda body: replies.pop(0)
    before = datetime.now().strftime("%b%d").lower()
    try:
        done = python(clone, user_env(tiny_env, OPENAI_BASE_URL=llm.url), "agent.py", "--timeout", str(TIMEOUT_S),
                      "--eval-windows", "1", "--max-experiments", "2", timeout=600)
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    tag = next(t for t in {before, datetime.now().strftime("%b%d").lower()} if (clone / "runs" / t).is_dir())
    rows = pd.read_csv(clone / "results.tsv", sep="\t", keep_default_na=False, na_values=[""])
    assert rows["experiment"].tolist() == [0, 1, 2, 3] and rows["branch"].unique().tolist() == [f"autoresearch/{tag}"]
    assert rows["status"].tolist()[:2] == ["baseline", "baseline"]  # --baseline-runs 2, the default
    assert set(rows["status"][2:]) <= {"keep", "discard"} and (rows["val_ppl"] > 1).all(), rows.to_string()
    assert rows["description"].tolist()[2:] == ["a lower learning rate", "some weight decay"]
    assert (rows["protocol"] == "v1-smoke1w").all() and (rows["prompt_tokens"][2:] > 0).all()
    # the prefetch: experiment 3 was proposed before experiment 2's result (seen 1, not 2), told what was training,
    # and its reply came back while experiment 2 still ran (its row is written after training and scoring)
    assert rows["seen"].tolist()[2:] == [1, 1], rows["seen"].tolist()
    assert "This experiment is training now" in llm.requests[1]["messages"][-1]["content"]
    exp2 = git.Repo(clone).commit(rows["commit"][2])
    decided = datetime.fromisoformat(rows["timestamp"][2]).timestamp()
    assert exp2.committed_date - 1 <= llm.times[1] and llm.times[1] + LLM_DELAY_S <= decided + 1, \
        (exp2.committed_date, llm.times, decided)
    assert git.Repo(clone).active_branch.name == f"autoresearch/{tag}"
    assert "experiment 2: training" in done.stdout and "stopping: --max-experiments 2 reached" in done.stdout


# ---------------------------------------------------------------- the first commands, by hand
def test_prepare_then_train_then_the_test_split_by_hand(tiny_env, tmp_path):
    """`python prepare.py && python train.py` (stock constants, a deadline a few seconds ahead) records a manual
    row; the real evaluator scores its submission on the test split, which differs from validation."""
    clone = tool_clone(tmp_path / "ternary-autoresearch", None)
    env = user_env(tiny_env)
    setup = python(clone, env, "prepare.py")
    assert setup.returncode == 0 and "Next: python train.py" in setup.stdout, setup.stdout + setup.stderr
    trained = python(clone, {**env, "AR_DEADLINE": str(time.time() + 20)}, "train.py")  # EXPORT_RESERVE_S is 15
    assert trained.returncode == 0, trained.stderr[-3000:]
    submission = clone / "runs" / "manual" / "submission.pt"  # AR_SUBMISSION's default
    assert submission.is_file() and "submitted" in trained.stdout
    [row] = pd.read_csv(clone / "results.tsv", sep="\t").to_dict("records")
    assert row["status"] == "manual" and row["branch"] == "main" and row["val_ppl"] > 1, row
    done = python(clone, env, "prepare.py", "eval", str(submission), "--split", "test", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    test = json.loads(done.stdout.strip().splitlines()[-1])
    assert test["split"] == "test" and test["max_windows"] is None  # the whole split, by the real evaluator
    assert test["ppl"] > 1 and test["ppl"] != pytest.approx(row["val_ppl"], rel=1e-3)  # not validation again


# ---------------------------------------------------------------- the sweep on the real search space
def test_one_sweep_step_on_the_real_program_md(tiny_env, tmp_path):
    clone = tool_clone(tmp_path / "ternary-autoresearch")
    space = search_space((clone / "program.md").read_text())
    current = {name: knob["text"] for name, knob in find_knobs((clone / "train.py").read_text()).items()}
    (name, old, new), _ = sweep_next(space, current, [])
    done = python(clone, user_env(tiny_env), "agent.py", "--proposer", "sweep", "--max-experiments", "1", "--tag", "sweep1",
                  "--baseline-runs", "1", "--timeout", str(TIMEOUT_S), "--eval-windows", "1", timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    rows = pd.read_csv(clone / "results.tsv", sep="\t", keep_default_na=False, na_values=[""])
    assert rows["status"].tolist()[0] == "baseline" and rows["status"][1] in ("keep", "discard"), rows.to_string()
    assert rows["description"][1] == f"sweep: {name} {old} -> {new}" and rows["val_ppl"][1] > 1
    assert (rows["steps"] == QUICK["MAX_STEPS"]).all(), rows.to_string()  # from the real submissions' meta
    assert rows["prompt_tokens"].isna().all() and rows["cost_usd"].fillna(0).eq(0).all()
    tried = git.Repo(clone).commit(rows["commit"][1]).tree["train.py"].data_stream.read().decode()
    assert find_knobs(tried)[name]["text"] == new


# ---------------------------------------------------------------- --reply-format grammar, to llama.cpp
class Recorder:
    """A pass-through to the real server that keeps every request body (the grammar is in the request)."""

    def __init__(self, upstream: str):
        self.upstream, self.bodies = upstream, []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def forward(self, data: bytes | None) -> None:
                request = urllib.request.Request(recorder.upstream + self.path, data=data,
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=600) as r:
                        status, body = r.status, r.read()
                except urllib.error.HTTPError as exc:
                    status, body = exc.code, exc.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.forward(None)

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                recorder.bodies.append(json.loads(data))
                self.forward(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_grammar_replies_from_the_real_llama_cpp_server(llama_server, tmp_path):  # noqa: F811
    """One proposal: the GBNF grammar reaches llama.cpp, and its reply parses (it may still not apply to
    train.py: then an invalid row with the reason, never a training run). The stand-in harness and a short
    program.md keep the prompt small: on 2 CPU cores the server reads the real 7k-token prompt for minutes."""
    repo = make_research_repo(tmp_path / "clone")
    use_short_program(repo)
    recorder = Recorder(llama_server["url"].removesuffix("/v1"))
    try:
        done = run_agent(repo, recorder.url, "--max-experiments", "1", "--reply-format", "grammar", "--repair-turns", "0",
                         "--max-tokens", "1000", "--llm-timeout", "300", "--no-pipeline", timeout=600)
    finally:
        recorder.close()
    assert done.returncode == 0, done.stdout[-4000:]
    [request] = [b for b in recorder.bodies if "messages" in b]
    assert request["grammar"] == REPLY_GRAMMAR
    row = ledger(repo).iloc[-1]
    reply = (repo / "runs" / "t" / "1" / "response0.md").read_text()
    try:
        description, blocks, _ = parse_reply(reply, "stop", "grammar")  # the grammar's shape: parses when whole
    except ReplyError:  # cut at --max-tokens before its block closed (a 135M model's lines can be long)
        assert row["status"] == "invalid" and row["reason"], (reply, row.to_dict())
        return
    assert description and blocks, reply
    if row["status"] == "invalid":
        assert isinstance(row["reason"], str) and row["reason"], row.to_dict()
    else:
        assert row["status"] in ("keep", "discard") and row["description"] == description, row.to_dict()
