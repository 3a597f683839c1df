"""llama.cpp serving several visitors at once: CHATBOT_PARALLEL conversations decoded together in one batch.

Built on llama-cpp-python's low-level bindings (llama-cpp-python's high-level Llama decodes one sequence): one
llama_context with CHATBOT_PARALLEL sequences, each with its own KV stream of CHATBOT_N_CTX tokens, driven by
llama_cpp_slots.SlotScheduler; one sampler chain per sequence (llama_cpp_sampler.py). What a visitor gets is what
the serial backend (llama_cpp.py) gives: the same GGUF chat template, tokens, sampler chain, stop rules and text
streaming; only the batch shapes llama.cpp computes in differ (see tests/test_backend_llama_cpp_batched.py).
With CHATBOT_CACHE_MB > 0 each conversation's KV cells are kept after its reply (llama_cpp_seq_cache.py).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Iterator

import llama_cpp

from chatbot.backends.base import Chunk, GenerationParams, cancelled
from chatbot.backends.llama_cpp_sampler import SequenceSampler
from chatbot.backends.llama_cpp_seq_cache import SequenceCache
from chatbot.backends.llama_cpp_slots import Job, SlotScheduler
from chatbot.backends.token_text import token_piece
from chatbot.model_files import resolve_gguf
from chatbot.settings import ConfigError, Settings

N_BATCH = 512  # tokens per llama_decode call, llama-cpp-python's default n_batch (and n_ubatch)
POLL_SECONDS = 0.05  # how often a waiting stream looks at its cancel event


class BatchedLlamaCppBackend:
    name = "llama_cpp"

    def __init__(self, settings: Settings):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = resolve_gguf(settings.model, settings.gguf_file, settings.revision)
        shown = str(settings.model or path)
        # llama-cpp-python forwards llama.cpp's log to stderr unless its logger is quiet (as Llama(verbose=False) sets).
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = settings.llama_repack  # see llama_cpp.extra_buffers (AMX crashes on some VMs)
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), model_params)
        if not self.model:
            raise ConfigError(f"CHATBOT_MODEL={shown!r} could not be loaded by llama.cpp; accepted: a valid GGUF "
                              "model file")
        self.ctx = None
        try:
            self.vocab = llama_cpp.llama_model_get_vocab(self.model)
            template = llama_cpp.llama_model_chat_template(self.model, None)
            if not template:
                raise ConfigError(f"CHATBOT_MODEL={shown!r} has no chat template in its GGUF metadata "
                                  "(tokenizer.chat_template); accepted: a chat/instruct model's GGUF")
            eos, bos = llama_cpp.llama_vocab_eos(self.vocab), llama_cpp.llama_vocab_bos(self.vocab)
            self.formatter = Jinja2ChatFormatter(
                template=template.decode("utf-8"),
                eos_token=token_piece(self.vocab, eos, special=True).decode("utf-8", "replace") if eos != -1 else "",
                bos_token=token_piece(self.vocab, bos, special=True).decode("utf-8", "replace") if bos != -1 else "",
                stop_token_ids=[eos])
            per_sequence = settings.n_ctx or llama_cpp.llama_model_n_ctx_train(self.model)
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = per_sequence * settings.parallel
            params.n_seq_max = settings.parallel
            params.kv_unified = False  # a KV stream per sequence: CHATBOT_N_CTX each, whatever the others hold
            params.n_batch = params.n_ubatch = min(N_BATCH, params.n_ctx)
            params.n_threads = params.n_threads_batch = settings.threads
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama-cpp-python's Llama
            self.ctx = llama_cpp.llama_init_from_model(self.model, params)
            if not self.ctx:
                raise ConfigError(f"CHATBOT_PARALLEL={settings.parallel} could not get a llama.cpp context of "
                                  f"{settings.parallel} × {per_sequence} tokens (out of memory?); accepted: fewer "
                                  "sequences, or a smaller CHATBOT_N_CTX")
        except BaseException:
            self.free()
            raise
        self.path = path
        self.model_name = path.name
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.max_concurrency = settings.parallel
        self.cache = SequenceCache(settings.cache_mb * 2**20) if settings.cache_mb > 0 else None
        self.scheduler = SlotScheduler(self.ctx, self.vocab, settings.parallel, llama_cpp.llama_n_batch(self.ctx),
                                       self.cache)

    def tokenize(self, text: str) -> list[int]:
        """The rendered prompt's tokens, special tokens parsed, nothing added (as the serial backend feeds them)."""
        data = text.encode("utf-8")
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, True)
        if n < 0:
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, True)
        return list(buf[:n])

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.tokenize(self.formatter(messages=messages).prompt))

    def stream(self, messages: list[dict], params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        rendered = self.formatter(messages=messages)
        prompt = self.tokenize(rendered.prompt)
        if not prompt or len(prompt) >= self.n_ctx:
            raise ValueError(f"Requested tokens ({len(prompt)}) exceed context window of {self.n_ctx}")
        job = Job(prompt, max_new_tokens=min(params.max_new_tokens, self.n_ctx - len(prompt)),
                  chooser=SequenceSampler(params, self.n_vocab), stops=list(rendered.stop or []),
                  key=params.conversation, cancel=cancel, keep_state=params.keep_state)
        self.scheduler.submit(job)
        try:
            while True:
                # Checked between chunks too: once stop is pressed nothing more is shown, even what was decoded.
                if cancelled(cancel):
                    yield Chunk("", "cancelled")
                    return
                try:
                    item = job.out.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            job.closed = True  # the engine ends this sequence at its next step (if it has not ended)

    def close(self) -> None:
        """Stop the engine thread and free llama.cpp's context and model."""
        self.scheduler.close()
        self.free()

    def free(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None
