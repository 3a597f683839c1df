"""llama.cpp (llama-cpp-python) on CPU: the default backend, serving a GGUF file.

The prompt is always built by the GGUF's own chat template (tokenizer.chat_template in its metadata),
never by llama-cpp-python's hand-written formats, which it would otherwise pick when a template merely
looks like ChatML. One Llama instance is not thread-safe (two threads decoding hit a GGML assert), so
every call holds the backend's lock. With CHATBOT_CACHE_MB > 0 each conversation's state is kept after its
reply (llama_cpp_cache.py), so a returning visitor's prompt is not processed again.

State is reused only within one conversation (GenerationParams.conversation; None-keyed requests share among
themselves): a request of another conversation starts from an empty context rather than from the tokens the
previous visitor left there, so nobody's history speeds up, and so reveals, anyone else's. Every request samples
with its own seed (a fresh random one when the request gives none): llama-cpp-python's load_state would otherwise
restore the cached conversation's seed and a retry would repeat the same reply.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from chatbot.backends.base import REPEAT_LAST_N, Chunk, GenerationParams, acquire, cancelled, fresh_seed
from chatbot.model_files import resolve_gguf
from chatbot.settings import ConfigError, Settings

TEMPLATE_KEY = "tokenizer.chat_template"
NOBODY = object()  # the live context after a request that keeps no state: no conversation may reuse it


@contextlib.contextmanager
def extra_buffers(enabled: bool):
    """Set llama.cpp's `use_extra_bufts` model parameter, which llama-cpp-python's Llama() does not expose.

    Extra buffer types repack weights for AMX or AVX2 kernels. On CPUs that advertise AMX inside some VMs
    (this project's CI machine) the AMX kernels segfault on the first multi-token batch, so by default
    they are off and llama.cpp's plain CPU kernels run; CHATBOT_LLAMA_REPACK=1 turns them back on.
    """
    import llama_cpp

    original = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = enabled
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = original


class LlamaCppBackend:
    name = "llama_cpp"
    max_concurrency = 1

    def __init__(self, settings: Settings):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = resolve_gguf(settings.model, settings.gguf_file, settings.revision)
        try:
            with extra_buffers(settings.llama_repack):
                self.llm = Llama(model_path=str(path), n_ctx=settings.n_ctx, n_threads=settings.threads,
                                 n_threads_batch=settings.threads, verbose=False, last_n_tokens_size=REPEAT_LAST_N,
                                 seed=settings.seed if settings.seed is not None else 0xFFFFFFFF)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ConfigError(f"CHATBOT_MODEL={str(settings.model or path)!r} could not be loaded by llama.cpp "
                              f"({exc}); accepted: a valid GGUF model file") from None
        template = self.llm.metadata.get(TEMPLATE_KEY)
        if not template:
            raise ConfigError(f"CHATBOT_MODEL={str(settings.model or path)!r} has no chat template in its GGUF "
                              f"metadata ({TEMPLATE_KEY}); accepted: a chat/instruct model's GGUF")
        # Llama registered this template under "chat_template.default"; select it explicitly so a template
        # that happens to equal a known one is not swapped for llama-cpp-python's hand-written format.
        self.llm.chat_format = "chat_template.default"
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self.llm.detokenize([eos], special=True).decode("utf-8", "replace") if eos != -1 else "",
            bos_token=self.llm.detokenize([bos], special=True).decode("utf-8", "replace") if bos != -1 else "",
            stop_token_ids=[eos])
        self.path = path
        self.model_name = path.name
        self.n_ctx = self.llm.n_ctx()
        self.lock = threading.Lock()
        self.live: object = None  # the conversation (key) whose tokens are in the llama.cpp context now, or NOBODY
        self.cache = None
        if settings.cache_mb > 0:
            from chatbot.backends.llama_cpp_cache import ConversationCache

            self.cache = ConversationCache(capacity_bytes=settings.cache_mb * 2**20)
            self.llm.set_cache(self.cache)

    def enter(self, conversation: str | None, keep_state: bool = True) -> None:
        """Make `conversation` the one whose state may be reused (called holding the lock): the context keeps another
        conversation's tokens only as far as llama.cpp's prefix match would reuse them, so it is emptied. A request
        that keeps no state starts from an empty context, finds nothing in the cache and leaves nothing there, and
        the next request starts from an empty context too."""
        if conversation != self.live or not keep_state:
            self.llm.reset()
        self.live = conversation if keep_state else NOBODY
        if self.cache is not None:
            self.cache.current, self.cache.keeping = conversation, keep_state

    def count_tokens(self, messages: list[dict]) -> int:
        # Exactly what create_chat_completion feeds the model: the rendered template, tokenised with specials.
        prompt = self.formatter(messages=messages).prompt
        with self.lock:
            return len(self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    def stream(self, messages: list[dict], params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        if not acquire(self.lock, cancel):
            yield Chunk("", "cancelled")
            return
        chunks = None
        try:
            self.enter(params.conversation, params.keep_state)
            chunks = self.llm.create_chat_completion(
                messages=messages, stream=True, max_tokens=params.max_new_tokens, temperature=params.temperature,
                top_p=params.top_p, min_p=params.min_p, repeat_penalty=params.repeat_penalty,
                seed=fresh_seed() if params.seed is None else params.seed)
            for chunk in chunks:
                # Checked between tokens: a stop request returns here and frees the model for the next user.
                if cancelled(cancel):
                    yield Chunk("", "cancelled")
                    return
                choice = chunk["choices"][0]
                text = choice["delta"].get("content") or ""
                if text:
                    yield Chunk(text, tokens=1)
                if choice.get("finish_reason"):
                    yield Chunk("", choice["finish_reason"])
                    # llama-cpp-python saves the state into the cache after its last chunk: let it get there
                    # (closing the generator now would skip the save).
                    for _ in chunks:
                        pass
                    return
            yield Chunk("", "stop")
        finally:
            if chunks is not None:
                chunks.close()
            self.lock.release()
