"""Whether an architecture keeps packed conversations apart: measured on its own modelling code, not assumed.

A packed row (conversations concatenated, position_ids restarting at 0, no attention_mask: what
training.trainer.packing's collator sends) must give every conversation the logits it gets alone. transformers
splits such a row only where the model hands its position_ids to the mask (sdpa / eager / flex: a block-diagonal
mask) or to the attention call (flash-attention's varlen kernel). OPT, Bloom and MPT build their masks (learned
positions, ALiBi) without them, and hybrid layers such as LFM2's short convolutions mix tokens across the boundary:
packing them trains on text that leaks from one conversation into the next.

So the check runs the architecture itself: a random copy of the base's config at toy width
(training.trainer.shapes.tiny_copy), one packed row of three conversations against each conversation alone, on the
CPU, in a fraction of a second. Flash-attention cannot run on a CPU; its path is replayed by an attention function
that does what transformers' flash path does with the inputs it is given (varlen over cu_seq_lens, else over the
segments where position_ids restart at 0, else one causal sequence), so what is measured is whether this model
passes those inputs down to its attention.
"""
from __future__ import annotations

TOLERANCE = 1e-4          # fp32 logits of the same tokens agree to ~2e-6 whatever else is in the batch
LENGTHS = (5, 9, 4)       # the conversations packed into the probe row
VARLEN = "varlen_probe"   # the registered stand-in for flash_attention_2/3/4
FLASH_KEY = "flash"       # the key flash_attention_* plans look up (see hardware._packing)
MAX_PARAMETERS = 20_000_000


def _varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, **kwargs):
    """flash_attention_forward's segmentation on the CPU: [b, heads, n, d] in, [b, n, heads, d] out."""
    import torch
    import torch.nn.functional as F

    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    n = query.shape[2]
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is not None:
        bounds = bounds.tolist()
    elif kwargs.get("position_ids") is not None and query.shape[0] == 1:
        starts = (kwargs["position_ids"].flatten() == 0).nonzero().flatten().tolist()
        bounds = (starts if starts and starts[0] == 0 else [0, *starts]) + [n]
    else:
        bounds = [0, n]
    parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                            scale=scaling) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, 2).transpose(1, 2).contiguous(), None


def _register_varlen() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN, _varlen_attention)
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)


def _tiny_model(config, attention: str):
    import torch
    from transformers import AutoModelForCausalLM

    from training.trainer.shapes import tiny_copy

    tiny = tiny_copy(config)
    if hasattr(tiny, "initializer_range"):
        # 5x the usual init: a leak then moves the logits by ~1 (0.0006 for LFM2 at 0.02) while fp32 noise stays ~1e-6
        tiny.initializer_range = 0.1
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(tiny).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the toy copy still has {size:,} parameters")
    implementation = {"default": None, FLASH_KEY: VARLEN}.get(attention, attention)
    if implementation == VARLEN:
        _register_varlen()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny, attn_implementation=implementation, dtype=torch.float32)
    model.config.use_cache = False  # as in training: with a cache transformers does not look for packed rows
    return model.eval(), tiny.vocab_size


def packed_logit_gap(model, vocab_size: int, flash_kwargs: bool = False) -> float:
    """Largest |logit| difference between a packed row (the training collator's batch) and its conversations run
    one by one; inf when either is not finite."""
    import torch

    from training.trainer.packing import make_packing_collator

    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, vocab_size - 1, (n,), generator=generator).tolist() for n in LENGTHS]
    batch = make_packing_collator(flash_attn_kwargs=flash_kwargs)([{"input_ids": r, "labels": r} for r in rows])
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r])).logits[0] for r in rows])
    if not (torch.isfinite(packed).all() and torch.isfinite(alone).all()):
        return float("inf")
    return (packed - alone).abs().max().item()


def check_packing(config, attention: str) -> tuple[bool, str]:
    """(packs correctly, the reason in words) for `config`'s architecture under `attention`: "default" (the
    architecture's own choice), "eager", "sdpa", "flex_attention", or "flash" (any flash_attention_*)."""
    kind = getattr(config, "model_type", "this model")
    try:
        model, vocab = _tiny_model(config, attention)
        name = "flash-attention (varlen)" if attention == FLASH_KEY else model.config._attn_implementation
        gap = packed_logit_gap(model, vocab, flash_kwargs=attention == FLASH_KEY)
    except Exception as exc:  # a config the toy copy cannot reproduce: not known to pack, so it does not
        return False, (f"packing with {attention} attention could not be checked on a toy {kind} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:120] if str(exc) else 'no message'}); padded batches")
    if gap <= TOLERANCE:
        how = ("the varlen kernel splits the row where position_ids restart" if attention == FLASH_KEY
               else "a block-diagonal causal mask from the restarting position_ids")
        return True, (f"checked on a toy {kind} with {name}: a packed row gives each conversation the logits it gets "
                      f"alone ({how}); no padding")
    return False, (f"checked on a toy {kind} with {name}: a packed row's logits differ from its conversations alone by "
                   f"{gap:.2g} (this architecture does not keep packed sequences apart); padded batches")


def packing_checks(config, attentions) -> dict[str, tuple[bool, str]]:
    """check_packing for each attention the plan may choose."""
    return {attention: check_packing(config, attention) for attention in dict.fromkeys(attentions)}
