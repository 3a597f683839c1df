"""The whole app: the real Gradio server on a free port, driven through gradio_client's /chat endpoint,
with the mock backend; and `python app.py` itself (fail-fast configuration errors, mock start-up)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatbot.backends.mock import MockBackend
from chatbot.settings import load_settings
from tools.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


class SpyBackend(MockBackend):
    """The mock backend, recording each request and when its stream really ended."""

    def __init__(self, settings):
        super().__init__(settings)
        self.calls: list[dict] = []

    def stream(self, messages, params, cancel=None):
        call = {"messages": messages, "params": params, "cancel": cancel, "ended": threading.Event(), "tokens": 0}
        self.calls.append(call)
        try:
            for chunk in super().stream(messages, params, cancel):
                call["tokens"] += chunk.tokens
                yield chunk
        finally:
            call["ended"].set()


@pytest.fixture(scope="module")
def app():
    from chatbot.ui import build_app

    settings = load_settings({"CHATBOT_BACKEND": "mock", "CHATBOT_MOCK_DELAY": "0.05", "CHATBOT_N_CTX": "200",
                              "CHATBOT_MAX_NEW_TOKENS": "40", "CHATBOT_MAX_INPUT_CHARS": "500"})
    backend = SpyBackend(settings)
    demo = build_app(settings, backend)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", backend
    demo.close()


def client(url):
    from gradio_client import Client
    return Client(url, verbose=False)


def ask(c, message, system="You are a pirate.", temperature=0.3, top_p=0.8, max_new_tokens=40):
    return c.submit(message, system, temperature, top_p, max_new_tokens, api_name="/chat")


def test_reply_streams_in_pieces_and_settings_reach_the_backend(app):
    url, backend = app
    outputs = list(ask(client(url), "Hello there"))
    replies = [reply for reply, _ in outputs]
    final, stats = outputs[-1]
    assert len(set(replies)) >= 3  # streamed: several growing versions, not one final message
    assert all(final.startswith(r) for r in replies)
    assert "You said: Hello there" in final and "system prompt: You are a pirate." in final
    assert "temperature=0.3 top_p=0.8 max_new_tokens=40" in final
    assert "tokens/s" in stats and "first token" in stats
    params = backend.calls[-1]["params"]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.3, 0.8, 40)
    # Left out by this caller: the settings' defaults apply.
    assert (params.repeat_penalty, params.min_p) == (1.2, 0.05)


def test_repetition_penalty_and_min_p_reach_the_backend(app):
    url, backend = app
    reply, _ = client(url).submit("Hi", "S", 0.3, 0.8, 40, 1.25, 0.1, api_name="/chat").result(timeout=60)
    assert "repeat_penalty=1.25 min_p=0.1" in reply
    params = backend.calls[-1]["params"]
    assert (params.repeat_penalty, params.min_p) == (1.25, 0.1)


def test_two_clients_in_parallel_get_their_own_answers(app):
    url, _ = app
    jobs = {name: ask(client(url), f"I am {name}") for name in ("alice", "bob")}
    for name, job in jobs.items():
        reply, _ = job.result(timeout=60)
        other = "bob" if name == "alice" else "alice"
        assert f"You said: I am {name}" in reply and other not in reply


def test_cancel_ends_the_backend_generator(app):
    url, backend = app
    long_message = "tell me " + "more " * 60  # the echo makes a ~80-token reply: ~4 s at 0.05 s a token
    job = ask(client(url), long_message, max_new_tokens=100)
    deadline = time.time() + 30
    while len(job.outputs()) < 3 and time.time() < deadline:
        time.sleep(0.05)
    call = backend.calls[-1]
    assert not call["ended"].is_set()
    job.cancel()
    assert call["ended"].wait(5)  # the backend's generator returned: the model is free again
    assert call["cancel"].is_set() and call["tokens"] < 60


def test_history_is_kept_per_session_and_trimmed_to_the_context(app):
    url, backend = app
    c = client(url)
    counts = []
    for i in range(6):
        reply, stats = ask(c, f"message number {i} " + "word " * 10).result(timeout=60)
        counts.append(int(reply.rsplit("messages:", 1)[1]))
    assert counts[:2] == [2, 4]  # system + one message, then + the previous turn: history reaches the backend
    assert max(counts) < 2 + 2 * 5  # later turns were trimmed...
    sent = backend.calls[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "You are a pirate."}  # ...keeping the system prompt
    assert sent[-1]["content"].startswith("message number 5")  # ...and the newest message
    assert sent[1]["role"] == "user"  # whole turns dropped
    assert backend.count_tokens(sent) + 40 <= 200
    assert "left out to fit the context" in stats


@pytest.mark.parametrize("message, expected", [
    ("   ", "Please type a message."),
    ("x" * 501, "the limit is 500 (CHATBOT_MAX_INPUT_CHARS)"),
    ("word " * 99, "too long for this model"),  # fits the 500 characters, not 200 tokens with 100 new ones
], ids=["empty", "over-char-limit", "over-context"])
def test_unusable_messages_get_a_clear_reply(app, message, expected):
    url, backend = app
    before = len(backend.calls)
    reply, stats = ask(client(url), message, max_new_tokens=100).result(timeout=60)
    assert reply.startswith("⚠️") and expected in reply
    assert len(backend.calls) == before  # the model was never asked


# --- python app.py ---------------------------------------------------------------------------------------------

def run_app(env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py"], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("env, var", [
    ({"CHATBOT_BACKEND": "nonsense"}, "CHATBOT_BACKEND='nonsense'"),
    ({"CHATBOT_N_CTX": "lots"}, "CHATBOT_N_CTX='lots'"),
    ({"CHATBOT_MODEL": "/no/such/model.gguf"}, "CHATBOT_MODEL='/no/such/model.gguf'"),
    ({"CHATBOT_BACKEND": "mock", "GRADIO_SERVER_PORT": "http"}, "GRADIO_SERVER_PORT='http'"),
])
def test_bad_configuration_exits_2_with_one_line_and_no_traceback(env, var):
    result = run_app(env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(var) and "accepted:" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_gguf_file_not_in_the_model_directory_exits_2(tmp_path, smollm2_gguf):
    (tmp_path / "smol-Q4_1.gguf").symlink_to(smollm2_gguf)
    result = run_app({"CHATBOT_MODEL": str(tmp_path), "CHATBOT_GGUF_FILE": "*Q4_K_M.gguf"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"CHATBOT_GGUF_FILE='*Q4_K_M.gguf' matches no file in '{tmp_path}'; "
                                     "accepted: one of smol-Q4_1.gguf")


def test_python_app_py_serves_the_mock_backend():
    from gradio_client import Client

    port = free_port()
    env = {**os.environ, "CHATBOT_BACKEND": "mock", "CHATBOT_MOCK_DELAY": "0", "GRADIO_SERVER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                c = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "app.py did not start serving"
                time.sleep(0.5)
        reply, _ = c.predict("Ahoy", "Be brief.", 0.2, 0.9, 64, api_name="/chat")
        assert "You said: Ahoy" in reply and "Be brief." in reply
    finally:
        proc.terminate()
        proc.wait(10)


def test_browser_shaped_history_reaches_the_backend_as_plain_strings():
    from chatbot.ui import make_respond

    settings = load_settings({"CHATBOT_BACKEND": "mock", "CHATBOT_MOCK_DELAY": "0"})
    backend = SpyBackend(settings)
    browser_history = [{"role": "user", "content": [{"type": "text", "text": "first"}], "metadata": None},
                       {"role": "assistant", "content": [{"type": "text", "text": "reply"}], "metadata": None}]
    *_, (reply, stats) = make_respond(settings, backend)("second", browser_history, "Sys", 0.5, 0.9, 64)
    assert backend.calls[-1]["messages"] == [{"role": "system", "content": "Sys"},
                                             {"role": "user", "content": "first"},
                                             {"role": "assistant", "content": "reply"},
                                             {"role": "user", "content": "second"}]
    assert "messages: 4" in reply and "tokens/s" in stats
