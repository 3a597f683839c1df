"""The openai backend against a tiny OpenAI-compatible SSE server on 127.0.0.1 (no network)."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chatbot.backends import GenerationParams, load_backend
from chatbot.settings import ConfigError, load_settings
from tools.ports import free_port

WORDS = ["Hello", " from", " the", " fake", " server", "."]


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay: float = 0.0, key: str | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.delay, self.key = delay, key
        self.requests: list[dict] = []
        self.disconnected = threading.Event()
        self.sent = 0


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args):
        pass

    def _authorised(self) -> bool:
        if self.server.key and self.headers.get("Authorization") != f"Bearer {self.server.key}":
            self._json(401, {"error": {"message": "Invalid API key", "type": "invalid_request_error"}})
            return False
        return True

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self._authorised():
            self._json(200, {"object": "list", "data": [{"id": "served-model", "object": "model",
                                                        "created": 0, "owned_by": "test"}]})

    def do_POST(self):
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        words = WORDS[:body.get("max_tokens") or len(WORDS)]
        finish = "length" if len(words) < len(WORDS) else "stop"
        try:
            for i, word in enumerate(words):
                self._event({"role": "assistant", "content": word} if i == 0 else {"content": word}, None)
                self.server.sent += 1
                time.sleep(self.server.delay)
            self._event({}, finish)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnected.set()

    def _event(self, delta: dict, finish: str | None) -> None:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "served-model",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()


@pytest.fixture
def server(request):
    srv = FakeServer(**getattr(request, "param", {}))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def backend_for(srv: FakeServer, **env):
    return load_backend(load_settings({"CHATBOT_BACKEND": "openai",
                                       "CHATBOT_OPENAI_BASE_URL": f"http://127.0.0.1:{srv.server_port}/v1", **env}))


def test_streams_the_servers_reply_with_our_parameters(server):
    backend = backend_for(server)
    assert backend.model_name == "served-model"  # unset CHATBOT_MODEL: the first model the server lists
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    params = GenerationParams(max_new_tokens=50, temperature=0.4, top_p=0.7, seed=3, min_p=0.1, repeat_penalty=1.15)
    chunks = list(backend.stream(messages, params))
    assert [c.text for c in chunks[:-1]] == WORDS and chunks[-1].finish_reason == "stop"
    sent = server.requests[0]
    assert sent["messages"] == messages and sent["stream"] is True and sent["model"] == "served-model"
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["seed"]) == (50, 0.4, 0.7, 3)
    # Passed through under the names llama.cpp's server (repeat_penalty) and vLLM (repetition_penalty) read.
    assert (sent["min_p"], sent["repeat_penalty"], sent["repetition_penalty"]) == (0.1, 1.15, 1.15)


def test_length_finish_and_explicit_model(server):
    backend = backend_for(server, CHATBOT_MODEL="my-model")
    chunks = list(backend.stream([{"role": "user", "content": "Hi"}], GenerationParams(max_new_tokens=2)))
    assert "".join(c.text for c in chunks) == "Hello from" and chunks[-1].finish_reason == "length"
    assert server.requests[0]["model"] == "my-model"


@pytest.mark.parametrize("server", [{"delay": 0.2}], indirect=True)
def test_cancel_closes_the_http_stream(server):
    backend = backend_for(server)
    cancel = threading.Event()
    chunks = []
    for chunk in backend.stream([{"role": "user", "content": "Hi"}], GenerationParams(), cancel):
        chunks.append(chunk)
        cancel.set()
    assert [c.finish_reason for c in chunks] == [None, "cancelled"]
    assert server.disconnected.wait(5)  # the server saw the client go away mid-reply
    assert server.sent < len(WORDS)


def test_count_tokens_is_a_growing_estimate(server):
    backend = backend_for(server, CHATBOT_N_CTX="1024")
    assert backend.n_ctx == 1024
    short = backend.count_tokens([{"role": "user", "content": "hi"}])
    long = backend.count_tokens([{"role": "user", "content": "hi " * 300}])
    assert 0 < short < long and long >= 900 / 4


def test_unreachable_server_fails_with_one_line():
    port = free_port()  # nothing listens there
    with pytest.raises(ConfigError) as info:
        load_backend(load_settings({"CHATBOT_BACKEND": "openai",
                                    "CHATBOT_OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1"}))
    assert str(info.value).startswith(f"CHATBOT_OPENAI_BASE_URL='http://127.0.0.1:{port}/v1'")
    assert "\n" not in str(info.value) and "accepted:" in str(info.value)


@pytest.mark.parametrize("server", [{"key": "right"}], indirect=True)
def test_wrong_key_names_openai_api_key(server):
    with pytest.raises(ConfigError, match=r"^OPENAI_API_KEY .*accepted:"):
        backend_for(server, OPENAI_API_KEY="wrong")
    assert backend_for(server, OPENAI_API_KEY="right").model_name == "served-model"
