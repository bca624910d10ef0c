"""A real HTTP server on 127.0.0.1 speaking OpenAI chat completions, with scripted replies and faults.

Each request takes the next scripted item; with none left it answers with a default edit of the
stand-in train.py (PPL scaled by `default_factor`). Items:
  "text"                                     a reply with this content
  {"content": ..., "finish_reason": ...}     a reply
  {"status": 429, "headers": {...}, "body": b"..."}   an HTTP error (or any raw body)
  {"hang": seconds}                          sleep, then answer with the next default reply
  {"reset": True}                            close the connection without an answer
  {"choices": []}                            a 200 response with no choices (or any choices)
Context limits, like llama.cpp: with n_ctx set, a prompt longer than n_ctx tokens (chars / chars_per_token,
SmolLM2's ratio on train.py) is refused with llama.cpp's 400 (overflow_body replaces its body). GET /props
says n_ctx when props is true (404 otherwise, as other servers); models_meta adds fields to /v1/models's entry.
`usage` lists each answered request's (prompt, completion) tokens as reported.
"""
import json
import re
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def ppl_edit(text: str, factor: float, knob: str = "PPL") -> str | None:
    """An edit of the stand-in train.py that scales its score; knob PPL or PPL_SCALE (both multiply it)."""
    match = re.search(rf"^{knob} = ([0-9.]+)(.*)$", text, re.M)
    if not match:
        return None
    old = float(match.group(1))
    return (f"DESCRIPTION: scale {knob} by {factor}\n<<<<<<< SEARCH\n{match.group(0)}\n=======\n"
            f"{knob} = {round(old * factor, 6)}{match.group(2)}\n>>>>>>> REPLACE\n")


class FakeLLM:
    def __init__(self, script=None, port: int = 0, default_factor=0.9, latency: float = 0.0, alternate: bool = False,
                 n_ctx: int | None = None, props: bool = False, models_meta: dict | None = None):
        self.script = deque(script or [])
        self.requests: list[dict] = []
        self.usage: list[tuple[int, int]] = []
        self.n_ctx, self.props, self.models_meta = n_ctx, props, models_meta or {}
        self.chars_per_token = 3.2
        self.overflow_body: bytes | None = None
        self.overflows = 0  # requests refused as too long
        self.times: list[float] = []  # when each request arrived
        self.default_factor = default_factor  # a number, or a function returning one per reply
        self.latency = latency
        self.latency_fn = None  # or a function giving each default reply's latency
        self.alternate = alternate  # default replies alternate between two knobs (compatible changes)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def push(self, *items) -> None:
        with self.lock:
            self.script.extend(items)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def default_reply(self, body: dict) -> str:
        for message in reversed(body.get("messages", [])):
            factor = self.default_factor() if callable(self.default_factor) else self.default_factor
            knob = "PPL_SCALE" if self.alternate and len(self.requests) % 2 else "PPL"
            edit = ppl_edit(message.get("content") or "", factor, knob)
            if edit:
                return edit
        return "DESCRIPTION: nothing to edit\n"

    def _handler(self):
        llm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/props"):
                    if llm.props and llm.n_ctx:
                        self.send(200, json.dumps({"default_generation_settings": {"n_ctx": llm.n_ctx}}).encode())
                    else:
                        self.send(404, b'{"error": {"message": "File Not Found", "code": 404}}')
                    return
                entry = {"id": "fake", "object": "model", **llm.models_meta}
                self.send(200, json.dumps({"object": "list", "data": [entry]}).encode())

            def prompt_tokens(self, body: dict) -> int:
                return int(sum(len(m.get("content") or "") for m in body.get("messages", [])) / llm.chars_per_token)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with llm.lock:
                    llm.requests.append(body)
                    llm.times.append(time.time())
                    too_long = llm.n_ctx is not None and self.prompt_tokens(body) > llm.n_ctx
                    llm.overflows += too_long
                    item = llm.script.popleft() if llm.script and not too_long else None
                if too_long:  # llama.cpp's answer, word for word; the scripted item waits for the next request
                    n = self.prompt_tokens(body)
                    self.send(400, llm.overflow_body or json.dumps({"error": {
                        "code": 400, "message": f"request ({n} tokens) exceeds the available context size "
                        f"({llm.n_ctx} tokens), try increasing it", "type": "exceed_context_size_error",
                        "n_prompt_tokens": n, "n_ctx": llm.n_ctx}}).encode())
                    return
                if isinstance(item, dict) and "hang" in item:
                    threading.Event().wait(item["hang"])
                    item = None
                if isinstance(item, dict) and item.get("reset"):
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.connection.close()
                    return
                if isinstance(item, dict) and "status" in item:
                    default = json.dumps({"error": {"message": f"scripted {item['status']}", "type": "error"}})
                    self.send(item["status"], item.get("body", default.encode()), item.get("headers"))
                    return
                if isinstance(item, dict) and "body" in item:
                    self.send(200, item["body"])
                    return
                if item is None:
                    threading.Event().wait(llm.latency_fn() if llm.latency_fn else llm.latency)
                    item = llm.default_reply(body)
                if isinstance(item, str):
                    item = {"content": item}
                content = item.get("content")
                prompt_chars = sum(len(m.get("content") or "") for m in body.get("messages", []))
                with llm.lock:
                    llm.usage.append((prompt_chars // 4, len(content or "") // 4))
                choices = item.get("choices", [{"index": 0, "finish_reason": item.get("finish_reason", "stop"),
                                                "message": {"role": "assistant", "content": content}}])
                self.send(200, json.dumps({
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": choices,
                    "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": len(content or "") // 4,
                              "total_tokens": prompt_chars // 4 + len(content or "") // 4}}).encode())

        return Handler
