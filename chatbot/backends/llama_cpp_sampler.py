"""One llama.cpp sampler chain per sequence, built from a request's GenerationParams.

The chain is the one llama-cpp-python's Llama builds for create_chat_completion (Llama._init_sampler with its
defaults): repetition penalty over the last REPEAT_LAST_N generated tokens, then greedy at temperature 0, else
top-k 40, typical 1, top-p, min-p, temperature and a draw seeded with the request's seed. The same settings and
seed over the same logits give the same tokens on the serial and the batched path.
"""
from __future__ import annotations

import llama_cpp

from chatbot.backends.base import REPEAT_LAST_N, GenerationParams, fresh_seed

TOP_K = 40  # llama-cpp-python's create_chat_completion default; the app has no setting for it


class SequenceSampler:
    """The sampler chain of one sequence; `sample` picks (and accepts) the token for a row of the last batch."""

    def __init__(self, params: GenerationParams, n_vocab: int):
        self.seed = fresh_seed() if params.seed is None else params.seed
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        stages = [llama_cpp.llama_sampler_init_penalties(n_vocab, REPEAT_LAST_N, params.repeat_penalty, 0.0, 0.0)]
        if params.temperature == 0:
            stages.append(llama_cpp.llama_sampler_init_greedy())
        else:
            stages += [llama_cpp.llama_sampler_init_top_k(TOP_K),
                       llama_cpp.llama_sampler_init_typical(1.0, 1),
                       llama_cpp.llama_sampler_init_top_p(params.top_p, 1),
                       llama_cpp.llama_sampler_init_min_p(params.min_p, 1),
                       llama_cpp.llama_sampler_init_temp(params.temperature),
                       llama_cpp.llama_sampler_init_dist(self.seed)]
        for stage in stages:  # the chain owns its stages and frees them with itself
            llama_cpp.llama_sampler_chain_add(self.chain, stage)

    def sample(self, ctx, row: int) -> int:
        """The next token from the logits of `row` (its index in the last decoded batch); the repetition penalty
        remembers it."""
        return llama_cpp.llama_sampler_sample(self.chain, ctx, row)

    def close(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
