"""What the prompt's order costs a server with a prefix cache: the driver's prompts for a night of discards (the
ledger grows by a row, train.py stays), sent to a real llama.cpp server (xllamacpp + SmolLM2-135M-Instruct) in
today's order (program.md, train.py, then the ledger) and in the earlier one (the ledger before train.py).

    python bench/prompt_cache.py [--discards 4] [--rows 1]

--rows: the ledger's rows before the first prompt (a night under way: past LEDGER_TAIL_ROWS the shown rows are
a window, which moves LEDGER_WINDOW_STEP rows at a time).

Each request asks for one token, so its time is the prompt's reading. prompt_n: the tokens the server read (the
rest came from its cache). Each order gets a fresh server: llama.cpp keeps earlier prompts' states besides the slot's.
"""
import argparse
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd

from common import header, start_llama_server

import agent  # noqa: E402
from driver.propose import build_prompt
from driver.session import open_session
from driver_helpers import make_research_repo  # noqa: E402
from prepare import LEDGER_COLUMNS  # noqa: E402


def ledgers(first: int, discards: int) -> list[pd.DataFrame]:
    """The ledger of `first` rows (a baseline, then discards), then after each further discard."""
    rows = [{c: None for c in LEDGER_COLUMNS} | {"experiment": 0, "status": "baseline", "val_ppl": 41.3,
                                                 "description": "baseline", "protocol": "v1"}]
    for n in range(1, first + discards):
        rows.append(rows[0] | {"experiment": n, "status": "discard", "val_ppl": 41.3 + n / 100,
                               "description": f"change {n}"})
    return [pd.DataFrame(rows[:n]) for n in range(first, first + discards + 1)]


def ledger_first(user: str, train_py: str) -> str:
    """The same prompt in the order before this change: train.py after the ledger, before the last line."""
    code = "# train.py (current)\n```python\n" + train_py + "```"
    rest, last = user.replace(code + "\n\n", "").rsplit("\n\n", 1)
    return f"{rest}\n\n{code}\n\n{last}"


def ask(url: str, messages: list[dict]) -> tuple[float, int]:
    """(seconds, prompt tokens the server read) for one request of one token."""
    body = json.dumps({"model": "local", "messages": messages, "max_tokens": 1, "cache_prompt": True}).encode()
    request = urllib.request.Request(url + "/chat/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            reply = json.load(response)
    except urllib.error.HTTPError as exc:
        sys.exit(f"the server refused a prompt: {exc.read()[:500]!r}")
    return time.perf_counter() - start, int(reply.get("timings", {}).get("prompt_n", -1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--discards", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    repo = make_research_repo(Path(tempfile.mkdtemp()) / "research", real=True)
    session = open_session(agent.parse_args(["--repo", str(repo)]))
    train_py = (repo / "train.py").read_text()
    prompts = [build_prompt(session, train_py, rows=rows) for rows in ledgers(args.rows, args.discards)]
    orders = {"the ledger before train.py (before)": lambda user: ledger_first(user, train_py),
              "train.py before the ledger (now)": lambda user: user}
    table = {}
    for name, order in orders.items():
        proc, url = start_llama_server(n_ctx=16384)  # README's advice: a long night's ledger needs it
        try:
            table[name] = [ask(url, [system, {"role": "user", "content": order(user["content"])}])
                           for system, user in prompts]
        finally:
            proc.kill()
            proc.wait()
    print(header("The prompt's order and the server's prefix cache"))
    print(f"SmolLM2-135M-Instruct Q4_1 on a llama.cpp server (xllamacpp, 2 threads reading the prompt); the real "
          f"program.md and train.py; the prompt with a ledger of {args.rows} rows, then after each of {args.discards} "
          "discards\n")
    print("| order | first prompt: s | tokens read | after a discard: s (mean) | tokens read (mean) | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = None
    for name, runs in table.items():
        later = runs[1:]
        mean_s = sum(s for s, _ in later) / len(later)
        base = base or mean_s
        print(f"| {name} | {runs[0][0]:.1f} | {runs[0][1]} | {mean_s:.2f} | "
              f"{sum(n for _, n in later) / len(later):.0f} | {mean_s / base:.2f} |")


if __name__ == "__main__":
    main()
