"""The LLM: an OpenAI-compatible endpoint through the openai package; its context window, the reply's token
budget, retries through outages, refusals explained, and `chat`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from typing import TYPE_CHECKING

from driver.common import FatalError, StopNight, log, one_line
from driver.session import CHARS_PER_TOKEN, Session

if TYPE_CHECKING:  # imported where a client is made: 0.6 s that status, report, the sweep and --help never need
    import openai

# max_tokens by default: a whole-file reply is the largest legitimate one, so train.py's length with
# room to spare; a fixed 8192 let a small model ramble for many minutes
REPLY_TOKENS_FACTOR = 1.3
REPLY_TOKENS_EXTRA = 512
KNOB_REPLY_TOKENS = 256        # a knob reply is one short JSON object
PROBE_TIMEOUT_S = 10           # reading the server's context window at start
# a 400/413 that means "the prompt does not fit": llama.cpp, OpenAI, vLLM and others
CONTEXT_OVERFLOW = re.compile(r"context size|context length|context window|maximum context|too many tokens|"
                              r"exceed_context_size|context_length_exceeded|prompt is too long", re.I)
OUTAGE_MAX_WAIT_S = 600        # longest sleep between tries while an endpoint is down
# llama.cpp accepts a GBNF grammar: the reply then always has the text format's structure.
# Bounded (at most 2 blocks of 6 lines) so that a rambling small model still ends its reply; one
# focused change fits, and a strong model does not need this mode.
REPLY_GRAMMAR = r'''root ::= "DESCRIPTION: " [^\n]{1,160} "\n" block block?
block ::= "<<<<<<< SEARCH\n" body "=======\n" body ">>>>>>> REPLACE\n"
body ::= line{1,6}
line ::= [^<=>\n] [^\n]{0,100} "\n"
'''
REPLY_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["description", "edits"],
    "properties": {
        "description": {"type": "string"},
        "edits": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["search", "replace"],
            "properties": {"search": {"type": "string"}, "replace": {"type": "string"}}}},
    },
}


class ContextOverflow(Exception):
    """The endpoint refused the request as longer than its context; n_ctx when the error says it."""

    def __init__(self, message: str, n_ctx: int | None = None):
        super().__init__(message)
        self.n_ctx = n_ctx


def llm_configured(args) -> bool:
    return bool(args.base_url or os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_KEY"))


def choose_proposer(args) -> str:
    """--proposer auto: the LLM when an endpoint is configured, else the built-in sweep (with a banner saying so)."""
    if args.proposer != "auto":
        return args.proposer
    if llm_configured(args):
        return "llm"
    log("no LLM endpoint configured: running the built-in sweep over program.md's search space; to let an LLM "
        "propose the changes, set OPENAI_API_KEY (OpenAI) or OPENAI_BASE_URL, or pass --base-url")
    return "sweep"


def make_client(args) -> openai.OpenAI:
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    key = os.environ.get("OPENAI_API_KEY")
    if not key and not base_url:
        raise FatalError("no LLM endpoint configured: set OPENAI_API_KEY (for OpenAI) or OPENAI_BASE_URL "
                         "(e.g. http://127.0.0.1:8080/v1 for a llama.cpp server), or pass --base-url")
    import openai
    return openai.OpenAI(api_key=key or "local", base_url=base_url, timeout=args.llm_timeout, max_retries=2)


def server_context(client: openai.OpenAI, model: str) -> tuple[int | None, str]:
    """The server's context window in tokens where it says so: llama.cpp's /props (n_ctx), or the model's
    entry in /v1/models (vLLM's max_model_len, llama.cpp's meta.n_ctx). (None, "") when it does not."""
    import urllib.request
    base = str(client.base_url).rstrip("/")

    def get(url: str):
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {client.api_key}"})
        with contextlib.suppress(Exception), urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            return json.loads(response.read())
        return None

    props = get(re.sub(r"/v1$", "", base) + "/props")
    with contextlib.suppress(Exception):
        return int(props["default_generation_settings"]["n_ctx"]), "llama.cpp /props"
    listed = get(base + "/models")
    with contextlib.suppress(Exception):
        entries = [m for m in listed["data"] if m.get("id") == model] or (listed["data"] if len(listed["data"]) == 1 else [])
        entry = entries[0]
        return int(entry.get("max_model_len") or entry["meta"]["n_ctx"]), "/v1/models"
    return None, ""


def context_window(args, client: openai.OpenAI) -> int | None:
    """The prompt's budget: the server's context where it says so, else --context; the smaller of the two
    when both are known (--context may ask for less). None: unknown, no budget."""
    found, where = server_context(client, args.model)
    known = [n for n in (found, args.context) if n]
    if not known:
        log("LLM context window: unknown (the server does not say): pass --context N to budget the prompt")
        return None
    context = min(known)
    log(f"LLM context window: {context} tokens ({where or '--context'}" +
        (f"; the server says {found}, --context {args.context})" if found and args.context else ")"))
    return context


def estimate_tokens(text: str, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    return math.ceil(len(text) / chars_per_token)


def reply_tokens(args, train_py: str) -> int:
    """max_tokens before the context cap: --max-tokens, else room for a whole new train.py."""
    if args.reply_format == "knob":
        return args.max_tokens or KNOB_REPLY_TOKENS
    return args.max_tokens or int(estimate_tokens(train_py) * REPLY_TOKENS_FACTOR) + REPLY_TOKENS_EXTRA


def overflow_context(exc: openai.APIStatusError) -> int | None:
    """The context size an overflow error names (llama.cpp's n_ctx field; OpenAI's and vLLM's message)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    with contextlib.suppress(KeyError, TypeError, ValueError):
        return int(body["n_ctx"])
    match = re.search(r"maximum context length is (\d+)", str(exc.message))
    return int(match.group(1)) if match else None


def api_refusal(exc: openai.APIStatusError) -> str:
    """How to treat an HTTP error: 'overflow' (the prompt does not fit: shrink it), 'permanent' (asking
    again gives the same answer: stop) or 'transient' (wait and ask again)."""
    status, code = exc.status_code, str(getattr(exc, "code", "") or "")
    text = f"{code} {getattr(exc, 'type', '') or ''} {exc.message}"
    if status == 413 or (status == 400 and CONTEXT_OVERFLOW.search(text)):
        return "overflow"
    if status == 429 and (code == "insufficient_quota" or re.search(r"quota|billing|credit", text, re.I)):
        return "permanent"
    if 400 <= status < 500 and status not in (408, 425, 429):
        return "permanent"
    return "transient"


def refusal_hint(status: int) -> str:
    if status in (401, 403):
        return "Check OPENAI_API_KEY and that it may use --model"
    if status in (402, 429):
        return "The account's quota or credit is used up: add credit (or pick another --model/endpoint), then run " \
               "the same command again to resume"
    if status == 404:
        return "Check --model and OPENAI_BASE_URL"
    return ("The server rejects this request as malformed: check --model, --reply-format (json/grammar need the "
            "server's support), --max-tokens and --temperature")


def wait_or_stop(session: "Session", seconds: float, fault: str) -> None:
    """Sleep between tries while the endpoint is down, in short steps: Ctrl-C, the STOP file and --max-hours
    are honoured during an outage too."""
    until = time.time() + seconds
    while True:
        if session.stop_requested():
            raise StopNight(f"stop requested while the LLM endpoint was unavailable ({fault})")
        max_hours = session.args.max_hours
        if max_hours is not None and time.time() - session.started > max_hours * 3600:
            raise StopNight(f"--max-hours {max_hours} reached while the LLM endpoint was unavailable ({fault})")
        if time.time() >= until:
            return
        time.sleep(min(1.0, until - time.time()))


def tokens_used(usage) -> tuple[int, int]:
    counts = [getattr(usage, name, 0) for name in ("prompt_tokens", "completion_tokens")]
    return tuple(int(c) if isinstance(c, (int, float)) and c > 0 else 0 for c in counts)


def chat(session: "Session", messages: list[dict], max_tokens: int | None = None,
         schema: dict | None = None) -> tuple[str | None, str | None, int, int]:
    """One chat completion: (content, finish_reason, prompt tokens, completion tokens). Transient faults are
    waited out (logged); a refusal that asking again cannot change stops the driver (FatalError); a prompt
    longer than the server's context raises ContextOverflow."""
    kwargs = {"model": session.args.model, "messages": messages, "temperature": session.args.temperature}
    if max_tokens or session.args.max_tokens:
        kwargs["max_tokens"] = max_tokens or session.args.max_tokens
    if session.args.reply_format == "json":
        kwargs["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "edit", "schema": REPLY_SCHEMA, "strict": True}}
    elif session.args.reply_format == "grammar":
        kwargs["extra_body"] = {"grammar": REPLY_GRAMMAR}
    elif session.args.reply_format == "knob" and schema:  # not strict: OpenAI's strict mode lacks min/maxProperties
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "knobs", "schema": schema}}
    import openai  # loaded by make_client already: a dictionary lookup
    wait = 1.0
    while True:
        try:
            response = session.client.chat.completions.create(**kwargs)
            if not getattr(response, "choices", None):
                raise ValueError("the response has no choices")
            choice = response.choices[0]
            # a choice without a message (or with non-text content) is an empty reply: a repair turn, never a traceback
            content = getattr(getattr(choice, "message", None), "content", None)
            finish = getattr(choice, "finish_reason", None)
            if isinstance(content, str):  # a JSON string's lone surrogate (\ud800): ast.parse and a repair request
                # fail on it; U+FFFD, as the ledger shows it
                content = content.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return (content if isinstance(content, str) else None, finish if isinstance(finish, str) else None,
                    *tokens_used(getattr(response, "usage", None)))
        except openai.APIStatusError as exc:
            kind = api_refusal(exc)
            if kind == "overflow":
                raise ContextOverflow(f"{exc.status_code}: {one_line(exc.message, 200)}", overflow_context(exc)) from None
            if kind == "permanent":
                raise FatalError(f"the LLM endpoint refused the request ({type(exc).__name__} {exc.status_code}): "
                                 f"{one_line(exc.message, 300)}. {refusal_hint(exc.status_code)}") from None
            fault = f"{type(exc).__name__}: {one_line(str(exc), 120)}"
        except (openai.APIConnectionError, openai.APIResponseValidationError, ValueError) as exc:
            fault = f"{type(exc).__name__}: {one_line(str(exc), 120)}"
        log(f"LLM endpoint unavailable ({fault}); retrying in {wait:.0f} s")
        wait_or_stop(session, wait, fault)
        wait = min(wait * 2, OUTAGE_MAX_WAIT_S)
