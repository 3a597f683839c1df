"""Any OpenAI-compatible server (llama.cpp's llama-server, vLLM, TGI, ...) through the `openai` client.

The server owns the model, its chat template and its tokenizer, so count_tokens can only estimate
(about 3 characters a token, on the safe side); set CHATBOT_N_CTX to the server's context length.
"""
from __future__ import annotations

import threading
from typing import Iterator

from chatbot.backends.base import Chunk, GenerationParams, cancelled
from chatbot.settings import ConfigError, Settings, first_line

CHARS_PER_TOKEN = 3
PER_MESSAGE_TOKENS = 4


class OpenAIBackend:
    name = "openai"
    max_concurrency = 4  # the server batches or queues requests itself

    def __init__(self, settings: Settings):
        import openai

        self.client = openai.OpenAI(base_url=settings.openai_base_url, api_key=settings.openai_api_key,
                                    max_retries=1, timeout=600)
        # Start-up check, so a wrong URL or key fails now with one line rather than on the first message.
        url = settings.openai_base_url
        try:
            served = [m.id for m in self.client.models.list()]
        except openai.AuthenticationError as exc:
            raise ConfigError(f"OPENAI_API_KEY was refused by {url} ({first_line(exc)}); accepted: a key "
                              "this server accepts") from None
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            raise ConfigError(f"CHATBOT_OPENAI_BASE_URL={url!r} did not answer GET /models ({first_line(exc)}); "
                              "accepted: the /v1 base URL of a running OpenAI-compatible server") from None
        if settings.model is None and not served:
            raise ConfigError(f"CHATBOT_MODEL is unset and {url} lists no model; accepted: a model name the "
                              "server serves")
        self.model_name = settings.model or served[0]
        self.n_ctx = settings.n_ctx or 4096

    def count_tokens(self, messages: list[dict]) -> int:
        return 2 + sum(PER_MESSAGE_TOKENS + -(-len(m["content"]) // CHARS_PER_TOKEN) for m in messages)

    def stream(self, messages: list[dict], params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        response = self.client.chat.completions.create(
            model=self.model_name, messages=messages, stream=True, max_tokens=params.max_new_tokens,
            temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            # Not in OpenAI's API; llama.cpp's server reads min_p and repeat_penalty, vLLM min_p and
            # repetition_penalty, and both ignore the names they do not know.
            extra_body={"min_p": params.min_p, "repeat_penalty": params.repeat_penalty,
                        "repetition_penalty": params.repeat_penalty})
        try:
            for event in response:
                if cancelled(cancel):
                    yield Chunk("", "cancelled")
                    return
                if not event.choices:
                    continue
                choice = event.choices[0]
                text = choice.delta.content if choice.delta else None
                if text:
                    yield Chunk(text, tokens=1)
                if choice.finish_reason:
                    yield Chunk("", "length" if choice.finish_reason == "length" else "stop")
                    return
            yield Chunk("", "stop")
        finally:
            response.close()  # closing the HTTP stream is how a server learns to stop generating
