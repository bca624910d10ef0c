"""What the prompt's order costs a server with a prefix cache: the driver's prompts for a night of discards (the
ledger grows by a row, train.py stays), sent to a real llama.cpp server (xllamacpp + SmolLM2-135M-Instruct) in
today's order (program.md, train.py, then the ledger) and in the earlier one (the ledger before train.py).

    python bench/prompt_cache.py [--discards 4]

Each request asks for one token, so its time is the prompt's reading. prompt_n: the tokens the server read (the
rest came from its cache). Each order gets a fresh server: llama.cpp keeps earlier prompts' states besides the slot's.
"""
import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd

from common import header, start_llama_server

import agent  # noqa: E402
from driver.propose import build_prompt
from driver.session import open_session
from driver_helpers import make_research_repo  # noqa: E402
from prepare import LEDGER_COLUMNS  # noqa: E402


def ledgers(discards: int) -> list[pd.DataFrame]:
    """The ledger after the baseline and after each discard."""
    rows = [{c: None for c in LEDGER_COLUMNS} | {"experiment": 0, "status": "baseline", "val_ppl": 41.3,
                                                 "description": "baseline"}]
    for n in range(1, discards + 1):
        rows.append(rows[0] | {"experiment": n, "status": "discard", "val_ppl": 41.3 + n / 10,
                               "description": f"try change number {n} to the schedule"})
    return [pd.DataFrame(rows[:n + 1]) for n in range(discards + 1)]


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
    with urllib.request.urlopen(request, timeout=600) as response:
        reply = json.load(response)
    return time.perf_counter() - start, int(reply.get("timings", {}).get("prompt_n", -1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--discards", type=int, default=4)
    args = parser.parse_args()
    repo = make_research_repo(Path(tempfile.mkdtemp()) / "research", real=True)
    session = open_session(agent.parse_args(["--repo", str(repo)]))
    train_py = (repo / "train.py").read_text()
    prompts = [build_prompt(session, train_py, rows=rows) for rows in ledgers(args.discards)]
    orders = {"the ledger before train.py (before)": lambda user: ledger_first(user, train_py),
              "train.py before the ledger (now)": lambda user: user}
    table = {}
    for name, order in orders.items():
        proc, url = start_llama_server()
        try:
            table[name] = [ask(url, [system, {"role": "user", "content": order(user["content"])}])
                           for system, user in prompts]
        finally:
            proc.kill()
            proc.wait()
    print(header("The prompt's order and the server's prefix cache"))
    print(f"SmolLM2-135M-Instruct Q4_1 on a llama.cpp server (xllamacpp, 2 threads reading the prompt); the real "
          f"program.md and train.py; the prompt before the first proposal, then after each of {args.discards} "
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
