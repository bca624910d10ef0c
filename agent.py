"""The overnight driver: one LLM-proposed change to train.py per experiment, scored by prepare.py.

    python agent.py [--tag TAG] [--model NAME] [--max-experiments N] [--max-hours H] [--max-cost USD]
    python agent.py status [--tag TAG]

Each experiment: prompt the LLM (program.md, the ledger, train.py) → apply its ONE change to
train.py → commit → run train.py under a time limit in its own process group → score the
submission with `python prepare.py eval` in a fresh process → keep the commit if val_ppl improved,
else reset the branch to its parent (the discarded commit stays under a ref) → a ledger row.
The endpoint is the openai package's: OPENAI_API_KEY and/or OPENAI_BASE_URL (any OpenAI-compatible
server: OpenAI, vLLM, Ollama, llama.cpp).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import datetime

import git

import prepare
from driver.common import FatalError, StopNight, atomic_write, log
from driver.runner import harden_process
from driver.scoring import EVAL_TIMEOUT_S
from driver.session import open_session
from driver.llm import choose_proposer, context_window, make_client
from driver.checkout import git_failure
from driver.sweep import search_space
from driver.night import run_loop
from driver.report import branch_rows, night_report, plot_overlay, plot_progress, show_status


# ---------------------------------------------------------------- configuration
TRAIN_TIMEOUT_S = 300          # train.py's limit, start to exit (the research protocol's 5 minutes)
MAX_REPAIR_TURNS = 2           # extra LLM turns to fix a reply that does not apply or compile
MAX_FAILURES = 5               # consecutive crash/timeout/invalid experiments before stopping
LLM_TIMEOUT_S = 600            # one chat completion
SANDBOX_MODES = ("auto", "require", "off")


# ---------------------------------------------------------------- the loop
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "status", "plot", "report"])
    parser.add_argument("--tag", action="append", help="branch autoresearch/<tag> (run: today's date, e.g. nov27; "
                        "report/plot/status: the checked-out autoresearch/* branch, else the newest in results.tsv); "
                        "plot --tag A --tag B overlays several nights")
    parser.add_argument("--model", default=os.environ.get("AR_LLM_MODEL", "gpt-4o"), help="the LLM's model name")
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL)")
    parser.add_argument("--proposer", default="auto", choices=["auto", "llm", "sweep"],
                        help="who proposes each change: llm, sweep (no LLM: coordinate descent over program.md's "
                        "search-space block), auto (the LLM when an endpoint is configured, else the sweep)")
    parser.add_argument("--reply-format", default="text", choices=["text", "json", "grammar", "knob"],
                        help="json/grammar constrain a weak local model's reply so it always parses; knob: the reply "
                        "only sets one or two of train.py's constants (for models that cannot copy code exactly)")
    parser.add_argument("--max-experiments", type=int, help="stop after N proposed experiments in this start "
                        "(the baseline of a new branch is extra)")
    parser.add_argument("--max-hours", type=float)
    parser.add_argument("--max-cost", type=float, help="stop once the branch's LLM cost reaches this (USD)")
    parser.add_argument("--price-in", type=float, help="USD per 1M prompt tokens, for the cost column")
    parser.add_argument("--price-out", type=float, help="USD per 1M completion tokens")
    parser.add_argument("--timeout", type=float, default=TRAIN_TIMEOUT_S, help="train.py's limit in seconds")
    parser.add_argument("--eval-timeout", type=float, default=EVAL_TIMEOUT_S)
    parser.add_argument("--eval-windows", type=int, help="smoke runs on CPU: score only the first N windows")
    parser.add_argument("--max-failures", type=int, default=MAX_FAILURES)
    parser.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                        help="ask for the next change only after the current experiment is scored (strict protocol)")
    parser.add_argument("--strict", action="store_true",
                        help="the seed's plain rule: keep if lower, no confirmation runs for marginal gains")
    parser.add_argument("--baseline-runs", type=int, default=2, choices=range(1, 6),
                        help="score the unmodified train.py this often on a new branch (the noise estimate)")
    parser.add_argument("--repair-turns", type=int, default=MAX_REPAIR_TURNS, choices=range(0, 6),
                        help="extra LLM turns to fix a reply that does not apply")
    parser.add_argument("--max-tokens", type=int, help="the reply's limit (default: room for a whole new train.py); "
                        "capped to what the LLM's context leaves after the prompt")
    parser.add_argument("--context", type=int, help="the LLM's context window in tokens, when the server does not say "
                        "(llama.cpp's /props and vLLM's /v1/models do); the prompt shrinks to fit it")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--llm-timeout", type=float, default=LLM_TIMEOUT_S)
    parser.add_argument("--sandbox", default="auto", choices=SANDBOX_MODES,
                        help="run train.py under Landlock: auto (warn and run unsandboxed where the kernel lacks it), "
                        "require (refuse to start without it), off")
    parser.add_argument("--workers", type=int, default=1, help="experiments at once, one GPU each (GPUs 0..N-1 of "
                        "this host; a local Ray instance, see README: Many GPUs); 1: the one-GPU night, no Ray")
    parser.add_argument("--gpus", help="run one experiment at a time on each of these GPUs, e.g. 0,2,5 (implies --workers)")
    parser.add_argument("--ray", metavar="ADDRESS", help="run the experiments as Ray tasks, one GPU each, on the "
                        "cluster at ADDRESS (`auto`, or head-ip:6379; see README: Many hosts)")
    parser.add_argument("--repo", default=str(prepare.ROOT), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # several --tag: plot overlays them; any other command takes the last, as a plain option would
    args.tags = (args.tag or []) if args.command == "plot" else (args.tag or [])[-1:]
    args.tag = args.tags[-1] if args.tags else None
    if args.gpus is not None and not re.fullmatch(r"\d+(,\d+)*", args.gpus):
        parser.error(f"--gpus {args.gpus}: give GPU indices separated by commas, e.g. --gpus 0,1,2,3")
    if args.gpus and len(set(args.gpus.split(","))) != len(args.gpus.split(",")):
        parser.error(f"--gpus {args.gpus}: a GPU is listed twice")
    if args.gpus and args.workers not in (1, len(args.gpus.split(","))):
        parser.error(f"--workers {args.workers} --gpus {args.gpus}: give one of them (--gpus sets the number of workers)")
    if args.ray and (args.gpus or args.workers != 1):
        parser.error("--ray uses every GPU of the cluster: leave out --workers and --gpus")
    for name in ("timeout", "eval_timeout", "max_failures", "max_tokens", "context", "workers"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    # prices differ per provider and change often, and a local server costs nothing: no guessed table
    if args.max_cost is not None and (args.price_in is None or args.price_out is None):
        parser.error("--max-cost needs --price-in and --price-out (USD per 1M prompt/completion tokens, from your "
                     "provider's price list; 0 for a local server): without them no cost is counted")
    if args.command == "run" and args.tag is None:
        args.tag = datetime.now().strftime("%b%d").lower()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "status":
            return show_status(args)
        if args.command in ("plot", "report"):
            root, branch, rows = branch_rows(args)
            if args.command == "plot" and len(args.tags) > 1:
                log(f"wrote {plot_overlay(root / 'results.tsv', args.tags, root / 'progress-overlay.png')}")
                return 0
            if args.command == "plot":
                log(f"wrote {plot_progress(rows, branch, root / 'progress.png')}")
                return 0
            report = night_report(rows, branch, root / "runs" / args.tag, root)
            atomic_write(root / "runs" / args.tag / "report.md", report)
            print(report)
            return 0
        args.proposer = choose_proposer(args)
        client = make_client(args) if args.proposer == "llm" else None  # no endpoint: stop now, before any training
        harden_process()
        session = open_session(args)
        if client is not None:
            session.client = client
            session.context = context_window(args, client)
        else:
            search_space((session.root / "program.md").read_text())  # a broken block stops the night before it starts
            args.pipeline = False  # the next value depends on this result: nothing to ask for in advance
        try:
            return run_loop(session)
        except git.GitCommandError as exc:
            raise git_failure(session, exc) from None
    except FatalError as exc:
        log(f"error: {exc}")
        return 2
    except StopNight as exc:
        log(f"stopping: {exc}")
        return 0
    except KeyboardInterrupt:
        log("stopped now; restart with the same --tag to resume")
        return 130
if __name__ == "__main__":
    sys.exit(main())
