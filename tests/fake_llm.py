"""Local stand-ins for the OpenAI chat completions API and the Anthropic messages API, on 127.0.0.1.

The real SDKs talk to them over HTTP. Each server answers through ``answer(messages) -> text`` and can be told,
per prompt and attempt, to fail: ``faults(prompt, attempt) -> action`` where an action is one of ``None``
(answer), ``"429"``, ``"500"``, ``"401"``, ``"timeout"`` (sleep past the client's timeout), ``"bad_json"`` (a
200 whose body is not JSON) or ``"empty"`` (a 200 without any answer text). With ``usage=False`` answers carry
no token usage (some gateways and self-hosted servers omit it). Every request is recorded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeLLM:
    """A threaded HTTP server speaking one provider's API."""

    def __init__(
        self,
        api: str,
        answer: Callable[[list[dict[str, Any]]], str],
        faults: Callable[[str, int], str | None] | None = None,
        delay_s: float = 0.0,
        timeout_sleep_s: float = 1.5,
        usage: bool = True,
    ):
        self.api = api
        self.answer = answer
        self.faults = faults or (lambda prompt, attempt: None)
        self.delay_s = delay_s
        self.timeout_sleep_s = timeout_sleep_s
        self.usage = usage
        self.requests: list[dict[str, Any]] = []
        self.attempts: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                server.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        """What the recipe's baseline.base_url would say."""
        return f"http://127.0.0.1:{self.port}" + ("/v1" if self.api == "openai" else "")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        messages = list(body.get("messages", []))
        if self.api == "anthropic" and body.get("system"):
            messages = [{"role": "system", "content": body["system"]}, *messages]
        prompt = messages[-1]["content"] if messages else ""
        with self.lock:
            attempt = self.attempts[prompt] = self.attempts.get(prompt, 0) + 1
            self.requests.append(
                {
                    "path": handler.path,
                    "headers": {k.lower(): v for k, v in handler.headers.items()},
                    "body": body,
                    "prompt": prompt,
                }
            )
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            action = self.faults(prompt, attempt)
            if action == "timeout":
                time.sleep(self.timeout_sleep_s)
                action = None
            if action in ("429", "500", "401"):
                message = f"injected {action}"
                if action == "401":  # as real providers do: quote the key that was refused
                    given = handler.headers.get("x-api-key") or handler.headers.get("authorization", "")
                    message = f"Incorrect API key provided: {given.removeprefix('Bearer ')}"
                error = {"error": {"type": "error", "message": message}}
                self._send(handler, int(action), json.dumps(error).encode(), {"retry-after": "0"})
            elif action == "bad_json":
                self._send(handler, 200, b'{"choices": [', {})
            elif action == "empty":
                empty = {"choices": []} if self.api == "openai" else {"content": [], "type": "message"}
                self._send(handler, 200, json.dumps(empty).encode(), {})
            else:
                self._send(handler, 200, json.dumps(self._reply(body, messages)).encode(), {})
        finally:
            with self.lock:
                self.in_flight -= 1

    def _reply(self, body: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
        text = self.answer(messages)
        # Token counts: words in, words out (deterministic, so cost arithmetic can be checked by hand).
        tokens_in = sum(len(str(m["content"]).split()) for m in messages)
        tokens_out = len(text.split())
        if self.api == "openai":
            reply = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": tokens_in,
                    "completion_tokens": tokens_out,
                    "total_tokens": tokens_in + tokens_out,
                },
            }
        else:
            reply = {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "model": body.get("model"),
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
            }
        if not self.usage:
            reply.pop("usage")
        return reply

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict[str, str]) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            for key, value in headers.items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass
