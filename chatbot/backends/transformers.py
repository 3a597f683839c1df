"""transformers on CPU or a GPU: a merged model (local dir or Hub id), a base model + PEFT adapter, or — for tests
and comparisons only — a GGUF through transformers' GGUF loading (dequantised, so not a serving path).

CHATBOT_DEVICE picks the device and chatbot/device.py the precision (fp32 on CPU, bf16 on sm80+, fp16 below).
Generation runs in a worker thread feeding a TextIteratorStreamer; a StoppingCriteria watching the cancel
event ends it between tokens, and the stream waits for the thread before freeing the model's lock. The key/value
cache of the last reply is kept with its conversation key (GenerationParams.conversation), so that conversation's
next turn processes only the new tokens (one conversation: the llama_cpp backend keeps one per conversation).

On ZeroGPU (chatbot/zerogpu.py) each reply runs in the forked GPU worker instead: `_reply_on_gpu` gets plain data
only, keeps no cache (a later call may land in another worker, and the prompt costs the GPU milliseconds), and
stops when the reservation runs out; the lock, the cancel event and the speed estimate stay in the app's process.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Iterator

from chatbot import zerogpu
from chatbot.backends.base import REPEAT_LAST_N, Chunk, GenerationParams, acquire, cancelled
from chatbot.device import Placement, detect
from chatbot.model_files import EMBEDDED_REPO_ID, local_or_repo, resolve_gguf
from chatbot.settings import ConfigError, Settings, first_line
from chatbot.timing import ReplyClock


def _load_error(var: str, value: str, exc: BaseException) -> ConfigError:
    return ConfigError(f"{var}={value!r} could not be loaded by transformers ({first_line(exc)}); accepted: a "
                       "local directory or Hub repo id of a causal LM (reachable, or cached when HF_HUB_OFFLINE=1)")


def _load(settings: Settings, placement: Placement):
    """(model, tokenizer, display name) for the settings, weights in the placement's dtype (still on the CPU);
    ConfigError for anything the user must fix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(revision=settings.revision, dtype=placement.torch_dtype())
    model_id = settings.model
    if model_id is None and settings.adapter is not None:
        # An adapter records its base model: CHATBOT_ADAPTER alone is enough.
        from peft import PeftConfig
        adapter_ref = local_or_repo(settings.adapter, "CHATBOT_ADAPTER")
        try:
            model_id = PeftConfig.from_pretrained(str(adapter_ref), revision=settings.revision).base_model_name_or_path
        except (OSError, ValueError) as exc:
            raise _load_error("CHATBOT_ADAPTER", settings.adapter, exc) from None
    model_id = model_id or EMBEDDED_REPO_ID

    if settings.gguf_file or model_id.endswith(".gguf"):
        gguf = resolve_gguf(model_id, settings.gguf_file, settings.revision)
        source, kwargs = str(gguf.parent), dict(kwargs, gguf_file=gguf.name, revision=None)
    else:
        source = str(local_or_repo(model_id))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "dtype"})
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error("CHATBOT_MODEL", model_id, exc) from None

    name = Path(model_id).name
    if settings.adapter is not None:
        from peft import PeftModel
        adapter = str(local_or_repo(settings.adapter, "CHATBOT_ADAPTER"))
        try:
            # An adapter trained with added tokens ships its own tokenizer; the embeddings must grow to match.
            tokenizer = AutoTokenizer.from_pretrained(adapter, revision=settings.revision)
            if len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
        except (OSError, ValueError):
            pass  # no tokenizer in the adapter: the base model's it is
        try:
            model = PeftModel.from_pretrained(model, adapter, revision=settings.revision)
        except (OSError, ValueError, RuntimeError) as exc:
            raise _load_error("CHATBOT_ADAPTER", settings.adapter, exc) from None
        model = model.merge_and_unload()  # plain weights again: no per-token LoRA matmuls
        name = f"{name} + {Path(settings.adapter).name}"
    if not tokenizer.chat_template:
        raise ConfigError(f"CHATBOT_MODEL={model_id!r} has no chat template; accepted: a chat/instruct model "
                          "whose tokenizer defines chat_template")
    return model.eval(), tokenizer, name


def _streamer_class():
    from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor, StoppingCriteria, TextIteratorStreamer

    class CountingStreamer(TextIteratorStreamer):
        """TextIteratorStreamer that also counts generated tokens (it yields words, not tokens)."""
        generated = 0

        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.generated += value.numel()
            super().put(value)

    class StopOnEvent(StoppingCriteria):
        def __init__(self, *events: threading.Event | None):
            self.events = events

        def __call__(self, input_ids, scores, **kwargs):
            import torch
            stop = any(cancelled(e) for e in self.events)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    class RecentRepetitionPenalty(LogitsProcessor):
        """llama.cpp's repeat penalty: transformers' own, over the last REPEAT_LAST_N generated tokens only (its
        built-in `repetition_penalty` also counts every prompt token)."""

        def __init__(self, penalty: float, prompt_length: int):
            self.penalty = RepetitionPenaltyLogitsProcessor(penalty=float(penalty))
            self.prompt_length = prompt_length

        def __call__(self, input_ids, scores):
            start = max(self.prompt_length, input_ids.shape[1] - REPEAT_LAST_N)
            return self.penalty(input_ids[:, start:], scores) if input_ids.shape[1] > start else scores

    return CountingStreamer, StopOnEvent, RecentRepetitionPenalty


def _reusable(cache) -> bool:
    """A DynamicCache of full-attention layers can be cut back to any prefix; sliding-window or linear-attention
    layers cannot, so those models start every turn afresh."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


class TransformersBackend:
    name = "transformers"
    max_concurrency = 1

    def __init__(self, settings: Settings):
        import torch

        self.on_zerogpu = zerogpu.activate()  # before CUDA is looked at: on ZeroGPU `spaces` emulates it
        self.placement = detect(settings.device)
        torch.set_num_threads(settings.threads)
        model, self.tokenizer, self.model_name = _load(settings, self.placement)
        # Weights load once, here. On ZeroGPU this "cuda" is the emulation: the GPU worker gets them moved.
        self.model = model.to(self.placement.device)
        trained = getattr(self.model.config, "max_position_embeddings", None) or settings.n_ctx or 4096
        self.n_ctx = min(settings.n_ctx, trained) if settings.n_ctx else trained
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (eos[0] if eos else 0)  # id 0 is a real pad token
        self.lock = threading.Lock()
        self._classes = _streamer_class()
        # (conversation key, token ids, their DynamicCache) of the last reply; never on ZeroGPU
        self.kept: tuple[str | None, list[int], object] | None = None
        self.speed = zerogpu.DecodeSpeed()  # ZeroGPU: measured decode rate, for the seconds a reply reserves
        self._gpu_reply = zerogpu.on_gpu(self._reply_on_gpu) if self.on_zerogpu else None
        print(f"transformers backend: {self.placement.reason}"
              + (" on ZeroGPU, a GPU attached for each reply" if self.on_zerogpu else ""), file=sys.stderr)

    def _cache_for(self, ids: list[int], conversation: str | None):
        """The kept cache, if it is this conversation's, cut back to the prefix it shares with `ids` (at least one
        token left to process)."""
        kept, self.kept = self.kept, None  # generate() extends it in place: never hand it out twice
        if kept is None or kept[0] != conversation:
            return None
        _, old, cache = kept
        shared = 0
        for a, b in zip(old, ids):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(ids) - 1)
        if shared == 0:
            return None
        if cache.get_seq_length() > shared:
            cache.crop(shared - cache.get_seq_length())
        return cache

    def _encode(self, messages: list[dict], **kwargs):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self._encode(messages, return_dict=False))

    def stream(self, messages: list[dict], params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        if not acquire(self.lock, cancel):
            yield Chunk("", "cancelled")
            return
        try:
            if self._gpu_reply is None:
                yield from self._reply(messages, params, cancel, keep=params.keep_state)
            else:
                yield from self._stream_from_gpu(messages, params, cancel)
        finally:
            self.lock.release()

    def _stream_from_gpu(self, messages: list[dict], params: GenerationParams,
                         cancel: threading.Event | None) -> Iterator[Chunk]:
        """ZeroGPU, in the app's process: reserve the reply's seconds, relay the worker's chunks, watch `cancel`."""
        seconds = zerogpu.gpu_seconds(params.max_new_tokens, self.speed.estimate())
        chunks = self._gpu_reply(messages, params, seconds)
        clock = ReplyClock()
        try:
            for chunk in chunks:
                if cancelled(cancel):
                    break
                clock.add(chunk.text, chunk.tokens)
                yield chunk
            else:
                self.speed.record(clock.tokens - clock.tokens_at_first, clock.decode_s)
                return
        finally:
            # Closing spaces' generator sets its worker's stop event; the worker closes _reply_on_gpu after its
            # next chunk, and close() returns once the worker's call has ended (and the GPU is released).
            chunks.close()
        yield Chunk("", "cancelled")

    def _reply_on_gpu(self, messages: list[dict], params: GenerationParams, seconds: int) -> Iterator[Chunk]:
        """What runs in ZeroGPU's forked worker: plain data in, chunks out, nothing kept for the next call."""
        yield from self._reply(messages, params, None, keep=False, max_time=zerogpu.decode_budget(seconds))

    def _reply(self, messages: list[dict], params: GenerationParams, cancel: threading.Event | None,
               keep: bool, max_time: float | None = None) -> Iterator[Chunk]:
        """One reply, token by token: `cancel` (or closing this generator) ends it at the next token; `keep` reuses
        and keeps this conversation's KV cache; `max_time` cuts decoding after that many seconds."""
        import torch

        streamer_cls, stop_cls, penalty_cls = self._classes
        inputs = self._encode(messages, return_dict=True, return_tensors="pt").to(self.placement.device)
        streamer = streamer_cls(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        # The llama_cpp backend's sampling: top-k 40 (llama-cpp-python's default), top-p, min-p, repeat penalty.
        sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=40,
                        min_p=params.min_p or None) \
            if params.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        prompt_length = inputs["input_ids"].shape[1]
        processors = [penalty_cls(params.repeat_penalty, prompt_length)] if params.repeat_penalty != 1.0 else []
        conversation = getattr(params, "conversation", None)
        past = self._cache_for(inputs["input_ids"][0].tolist(), conversation) if keep else None
        result: dict = {}
        closing = threading.Event()  # set when the consumer goes away, without touching the caller's event

        def generate():
            try:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                with torch.inference_mode():
                    out = self.model.generate(
                        **inputs, max_new_tokens=params.max_new_tokens, streamer=streamer,
                        stopping_criteria=[stop_cls(cancel, closing)], eos_token_id=self.eos_ids,
                        pad_token_id=self.pad_id, logits_processor=processors,
                        return_dict_in_generate=True, **({"past_key_values": past} if past is not None else {}),
                        **({"max_time": max_time} if max_time is not None else {}), **sampling)
                result["ids"] = out.sequences
                cache = out.past_key_values
                if keep and cache is not None and _reusable(cache):
                    self.kept = (conversation, out.sequences[0, :cache.get_seq_length()].tolist(), cache)
            except BaseException as exc:  # surfaced to the caller below, after the streamer is unblocked
                result["error"] = exc
                streamer.end()

        worker = threading.Thread(target=generate, name="transformers-generate", daemon=True)
        stopped_by_caller = False
        try:
            worker.start()
            seen = 0
            for text in streamer:
                if cancelled(cancel):
                    stopped_by_caller = True
                    break
                if text:
                    now = streamer.generated
                    yield Chunk(text, tokens=now - seen)
                    seen = now
            else:
                stopped_by_caller = cancelled(cancel)
            worker.join()
            if "error" in result:
                raise result["error"]
            if stopped_by_caller:
                yield Chunk("", "cancelled")
                return
            new = result["ids"][0, prompt_length:].tolist()
            # Not ended by an end-of-turn token: max new tokens, or (ZeroGPU) the reserved seconds, cut it.
            finish = "stop" if new and new[-1] in self.eos_ids else "length"
            yield Chunk("", finish, tokens=streamer.generated - seen)
        finally:
            closing.set()  # a closed generator lands here: stop the worker at its next token
            if worker.ident is not None:
                worker.join()
