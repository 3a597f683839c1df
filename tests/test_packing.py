"""Packing must not change what is learned: packed loss/logits/gradients equal the unpacked ones."""
from __future__ import annotations

import math

import pytest
import torch

from training.trainer.packing import make_packing_collator, pack_rows, unpack_features

VOCAB = 256


def _conversation(gen: torch.Generator, n: int, prompt: int) -> dict:
    ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
    labels = [-100] * prompt + ids[prompt:]  # loss on the "assistant" part only, as chat_format does
    return {"input_ids": ids, "attention_mask": [1] * n, "labels": labels}


@pytest.fixture(scope="module")
def rows():
    gen = torch.Generator().manual_seed(0)
    return [_conversation(gen, n, p) for n, p in ((9, 3), (17, 5), (6, 2), (13, 4), (4, 1))]


def _model(attn: str):
    from training.trainer.shapes import build_random_model

    m = build_random_model("tiny-llama", seed=1, vocab_size=VOCAB)
    m.set_attn_implementation(attn)
    m.config.use_cache = False  # as in training: with a KV cache transformers does not look for packed sequences
    return m.eval()


def _token_weighted_loss(model, rows) -> torch.Tensor:
    """What the Trainer's unpacked path optimises: summed token losses over all rows / labelled-token count."""
    total, count = 0.0, 0
    for r in rows:
        out = model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]]))
        n = sum(label != -100 for label in r["labels"][1:])  # the loss shifts: label 0 is never predicted
        total, count = total + out.loss * n, count + n
    return total / count


def _padded_batch(rows) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
    return {"input_ids": torch.tensor(pad([r["input_ids"] for r in rows], 0)),
            "attention_mask": torch.tensor(pad([r["attention_mask"] for r in rows], 0)),
            "labels": torch.tensor(pad([r["labels"] for r in rows], -100))}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_logits_equal_unpacked(rows, attn):
    model = _model(attn)
    batch = make_packing_collator()(rows)
    assert batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert "attention_mask" not in batch  # a mask would switch off transformers' packed-sequence detection
    with torch.no_grad():
        packed = model(**batch)
        assert packed.loss.item() == pytest.approx(_token_weighted_loss(model, rows).item(), rel=1e-5)
        start = 0
        for r in rows:
            n = len(r["input_ids"])
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            torch.testing.assert_close(packed.logits[0, start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n


def test_concatenation_without_position_ids_would_leak(rows):
    """The control: plain concatenation lets later conversations see earlier ones, so the checks above bite."""
    model = _model("sdpa")
    batch = make_packing_collator()(rows)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"])
        packed = model(**batch)
    assert abs(leaky.loss.item() - packed.loss.item()) > 1e-3


def test_pretpacked_rows_give_padded_batch_loss_and_gradients(rows):
    """TRL's bfd packing + our collator == the padded (DataCollatorForSeq2Seq-style) batch, loss and grads."""
    packed_ds = pack_rows(rows, max_length=24)
    assert len(packed_ds) < len(rows)
    assert all(sum(r["seq_lengths"]) <= 24 for r in packed_ds)
    features = [packed_ds[i] for i in range(len(packed_ds))]
    unpacked = unpack_features(features)
    assert sorted(map(tuple, (u["input_ids"] for u in unpacked))) == sorted(tuple(r["input_ids"]) for r in rows)

    model = _model("sdpa").train()
    grads = []
    for batch in (make_packing_collator()(features), _padded_batch(rows)):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


def test_first_label_of_each_conversation_is_ignored(rows):
    batch = make_packing_collator()(unpack_features([{**rows[0], "labels": rows[0]["input_ids"]}] + rows[1:]))
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(rows)
    assert all(batch["labels"][0, s].item() == -100 for s in starts)


def test_pack_rows_rejects_bad_length(rows):
    with pytest.raises(ValueError, match="max_length"):
        pack_rows(rows, 0)


def test_finetune_trainer_packs_and_counts_real_tokens(rows, smollm2_tokenizer_dir, tmp_path):
    """finetune.build_trainer with train.packing: packed rows, flattened batches without a mask, and the Trainer's
    token count (what tokens/s is computed from) equals the real tokens it trained on."""
    from transformers import AutoTokenizer

    from training.config import TrainConfig
    from training.finetune import build_trainer
    from training.trainer.modeling import plan_training

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    tokenizer.pad_token = "<|endoftext|>"  # as prepare_tokenizer picks: a token real rows never contain
    assert all(tokenizer.pad_token_id not in r["input_ids"] for r in rows)
    cfg = TrainConfig()
    cfg.model.mode = "fp32"
    for key, value in dict(output_dir=str(tmp_path), max_length=24, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, max_steps=2, save_steps=100, report_to="none",
                           packing=True, use_liger=True, optim="adamw_torch", logging_steps=1).items():
        setattr(cfg.train, key, value)
    model = _model("sdpa").train()
    trainer = build_trainer(cfg, plan_training(cfg, config=model.config), model, tokenizer, rows)
    assert not trainer.args.use_liger_kernel  # no CUDA here: the standard loss, no ImportError
    assert len(trainer.train_dataset) < len(rows)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert trainer.state.num_input_tokens_seen == sum(len(r["input_ids"]) for r in rows)
