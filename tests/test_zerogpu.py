"""ZeroGPU: the seconds a reply reserves, and the decorated generation path run the way ZeroGPU runs it: `spaces`'
forked worker, chunks pickled back, the worker stopped when the app closes the stream (tests/zerogpu_harness.py,
with the device API and the CUDA emulation stood in). Also: off ZeroGPU nothing changes, and the UI's producer
thread carries the visitor's request, which ZeroGPU charges."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chatbot import zerogpu
from chatbot.settings import ConfigError

HARNESS = Path(__file__).resolve().parent / "zerogpu_harness.py"


# --- the duration rule -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("max_new_tokens", "tokens_per_s", "seconds"), [
    (512, zerogpu.PRIOR_TOKENS_PER_S, 31),   # the default reply before anything was measured: 5 + 25.6
    (512, 50.0, 16),                         # measured 50 tokens/s: 5 + 10.24
    (24, 20.0, 7),
    (1, 1000.0, 6),
    (4096, 20.0, zerogpu.CAP_S),             # the slider's top: capped, decoding cut at the cap
    (100_000, 1000.0, zerogpu.CAP_S),
])
def test_a_reply_reserves_start_plus_its_tokens_at_the_measured_rate_capped(max_new_tokens, tokens_per_s, seconds):
    assert zerogpu.gpu_seconds(max_new_tokens, tokens_per_s) == seconds


def test_decoding_stops_before_the_reservation_ends():
    assert zerogpu.decode_budget(31) == 31 - zerogpu.START_S
    assert zerogpu.decode_budget(zerogpu.START_S) == 1.0  # never zero: at least one token


def test_the_speed_estimate_is_the_slowest_recent_reply():
    speed = zerogpu.DecodeSpeed(prior=20.0, window=3)
    assert speed.estimate() == 20.0
    speed.record(5, 0.01)          # too short to say anything
    speed.record(100, 0.0)         # no time measured
    assert speed.estimate() == 20.0
    for tokens, seconds in ((100, 2.0), (100, 1.0), (100, 4.0)):
        speed.record(tokens, seconds)
    assert speed.estimate() == 25.0
    for tokens, seconds in ((100, 1.0), (100, 2.0), (100, 1.0)):  # the window moves on: 100, 50, 100
        speed.record(tokens, seconds)
    assert speed.estimate() == 50.0


# --- on and off ZeroGPU --------------------------------------------------------------------------------------------

def test_off_zerogpu_spaces_is_not_needed():
    assert zerogpu.on_zerogpu({}) is False and zerogpu.activate({}) is False
    assert zerogpu.on_zerogpu({"SPACES_ZERO_GPU": "false"}) is False
    assert zerogpu.on_zerogpu({"SPACES_ZERO_GPU": "True"}) is True


def test_zerogpu_without_the_spaces_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ModuleNotFoundError
    with pytest.raises(ConfigError) as info:
        zerogpu.activate({"SPACES_ZERO_GPU": "true"})
    assert str(info.value).startswith("SPACES_ZERO_GPU=true is not valid") and "\n" not in str(info.value)


def test_off_zerogpu_the_backend_decodes_in_this_process(tiny_llama_dir):
    from chatbot.backends import load_backend
    from chatbot.settings import load_settings

    backend = load_backend(load_settings({"CHATBOT_BACKEND": "transformers", "CHATBOT_MODEL": str(tiny_llama_dir),
                                          "CHATBOT_THREADS": "1"}))
    assert backend.on_zerogpu is False and backend._gpu_reply is None
    assert backend.placement.device == "cpu" and backend.placement.dtype == "float32"


# --- the decorated path, forked as ZeroGPU forks it -----------------------------------------------------------------

@pytest.fixture(scope="module")
def zerogpu_run(tiny_llama_dir):
    proc = subprocess.run([sys.executable, str(HARNESS), str(tiny_llama_dir)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # `spaces` prints debug lines before it


@pytest.fixture(scope="module")
def in_process_reply(tiny_llama_dir):
    from chatbot.backends import GenerationParams, load_backend
    from chatbot.settings import load_settings

    backend = load_backend(load_settings({"CHATBOT_BACKEND": "transformers", "CHATBOT_MODEL": str(tiny_llama_dir),
                                          "CHATBOT_THREADS": "1", "CHATBOT_N_CTX": "2048"}))
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]
    return "".join(c.text for c in backend.stream(messages, GenerationParams(max_new_tokens=24, temperature=0.0,
                                                                               repeat_penalty=1.1)))


def test_the_reply_is_decoded_in_the_forked_worker_and_streamed_back(zerogpu_run, in_process_reply):
    assert zerogpu_run["zerogpu"] is True
    reply = zerogpu_run["reply"]
    assert reply["pid"] != zerogpu_run["app_pid"]          # the model ran in ZeroGPU's worker, not the app
    assert reply["text"] == in_process_reply               # same tokens as decoding in the app's process
    assert (reply["finish"], reply["tokens"], reply["forwards"]) == ("length", 24, 24)
    assert reply["lock_free"]


def test_each_reply_reserves_the_rule_and_releases_the_gpu(zerogpu_run):
    first = zerogpu_run["reply"]
    assert first["reserved"] == zerogpu.gpu_seconds(24, zerogpu.PRIOR_TOKENS_PER_S) == 7
    for name in ("reply", "closed", "cancelled", "again"):
        assert zerogpu_run[name]["reserved"] == zerogpu_run[name]["expected_reserved"], name
    # After the first reply the measured rate (not the prior) sizes the reservation.
    assert zerogpu_run["estimate"] != zerogpu.PRIOR_TOKENS_PER_S
    calls = [c["path"] for c in zerogpu_run["device_api"]]
    assert calls.count("/schedule") == 4 and calls.count("/release") == 4
    assert all(c["fail"] == "false" for c in zerogpu_run["device_api"] if c["path"] == "/release")


def test_closing_the_stream_stops_the_workers_decoding(zerogpu_run):
    closed = zerogpu_run["closed"]  # max_new_tokens=1500, closed after its first text
    assert closed["forwards"] < 20, closed
    assert closed["forwards_later"] == 0  # nothing decodes after close() returned
    assert closed["lock_free"]


def test_the_cancel_event_stays_in_the_app_and_still_stops_the_worker(zerogpu_run):
    cancelled = zerogpu_run["cancelled"]
    assert cancelled["finish"] == "cancelled"
    assert cancelled["forwards"] < 20 and cancelled["forwards_later"] == 0
    assert cancelled["lock_free"]


def test_the_worker_is_reused_and_keeps_no_cache_between_calls(zerogpu_run):
    again, first = zerogpu_run["again"], zerogpu_run["reply"]
    assert again["text"] == first["text"]
    assert again["pid"] == first["pid"]                    # the idle worker served the later calls
    assert [c["path"] for c in zerogpu_run["device_api"]].count("/allow") == 1
    # The whole prompt was processed again: no KV cache survived in the worker (it would leave 1 token to process).
    assert again["prefill"] == zerogpu_run["prompt_tokens"]


# --- the UI side ----------------------------------------------------------------------------------------------------

def test_the_backend_runs_with_the_visitors_request_in_context():
    """spaces.GPU finds the visitor (and their quota) in gradio's LocalContext.request; stream_reply runs the
    backend in a thread of its own, which must see it."""
    from gradio.context import LocalContext

    from chatbot.backends.base import Chunk, GenerationParams
    from chatbot.reply import stream_reply

    class Recorder:
        seen = "unset"

        def stream(self, messages, params, cancel=None):
            Recorder.seen = LocalContext.request.get(None)
            yield Chunk("hi", "stop", tokens=1)

    visitor = object()
    token = LocalContext.request.set(visitor)
    try:
        list(stream_reply(Recorder(), [{"role": "user", "content": "x"}], GenerationParams()))
    finally:
        LocalContext.request.reset(token)
    assert Recorder.seen is visitor
