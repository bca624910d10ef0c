"""How many replies of a small local model parse and apply, per reply format: the real prompt (program.md,
an empty ledger, the real train.py) sent N times to a real llama.cpp server (xllamacpp + SmolLM2-135M-Instruct).

    python bench/reply_formats.py [--replies 20] [--max-tokens 400] [--formats text,json,grammar,knob] [--program FILE]

--program: the program.md in the prompt instead of the real one (tests/test_llamacpp.py sends a short one).
"""
import argparse
import tempfile
import time
from pathlib import Path

from common import header, start_llama_server

import agent  # noqa: E402
from driver.common import ReplyError
from driver.knobs import knob_schema, parse_knob_reply
from driver.edits import apply_blocks, knob_edit, parse_reply, validate_train_py
from driver.session import open_session
from driver.llm import chat, make_client
from driver.propose import build_prompt
from driver_helpers import make_research_repo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replies", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--formats", default="text,json,grammar,knob")
    parser.add_argument("--program", type=Path, help="program.md for the prompt (default: the real one)")
    args = parser.parse_args()
    repo = make_research_repo(Path(tempfile.mkdtemp()) / "research", real=True)
    if args.program:
        (repo / "program.md").write_text(args.program.read_text())
    proc, url = start_llama_server()
    table = []
    try:
        for fmt in args.formats.split(","):
            ns = agent.parse_args(["--repo", str(repo), "--base-url", url, "--model", "local", "--reply-format", fmt,
                                   "--max-tokens", str(args.max_tokens), "--temperature", "0.7"])
            session = open_session(ns)
            session.client = make_client(ns)
            train_py = (repo / "train.py").read_text()
            messages = build_prompt(session, train_py)
            schema = knob_schema(train_py) if fmt == "knob" else None
            parsed = applied = 0
            reasons = {}
            start = time.time()
            for _ in range(args.replies):
                content, finish, _, _ = chat(session, messages, schema=schema)
                try:
                    if fmt == "knob":  # parse: the JSON object; apply: names, values and the checks
                        parse_knob_reply(content or "")
                        parsed += 1
                        knob_edit(train_py, content, finish)
                    else:
                        _, blocks, whole = parse_reply(content, finish, fmt)
                        parsed += 1
                        new = whole if whole is not None else apply_blocks(train_py, blocks)
                        validate_train_py(train_py, new)
                    applied += 1
                except ReplyError as exc:
                    key = str(exc).split(":")[0][:60]
                    reasons[key] = reasons.get(key, 0) + 1
            table.append((fmt, parsed, applied, (time.time() - start) / args.replies, reasons))
    finally:
        proc.kill()
        proc.wait()
    print(header("Reply formats with a small local model"))
    print(f"SmolLM2-135M-Instruct Q4_1 on a llama.cpp server (xllamacpp), the first prompt "
          f"({'program.md: ' + str(args.program) if args.program else 'the real program.md'}), "
          f"{args.replies} replies per format, max_tokens {args.max_tokens}, temperature 0.7\n")
    print("| --reply-format | parse | apply (match + compile + checks) | s/reply | main rejection reasons |")
    print("| --- | ---: | ---: | ---: | --- |")
    for fmt, parsed, applied, secs, reasons in table:
        top = "; ".join(f"{k} ×{v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        print(f"| {fmt} | {parsed}/{args.replies} | {applied}/{args.replies} | {secs:.1f} | {top} |")


if __name__ == "__main__":
    main()
