"""The GPT-Neo and DialoGPT recipes as shipped (their LoRA targets, data formats, ChatML template and export
settings), run end to end on tiny random models of the same architectures with a GPT-2-style byte-level BPE
tokenizer that has no chat template; only sizes, steps and data paths are changed. Then the Space's
transformers backend serves the result with the prompt ids training used."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from training.config import apply_overrides, load_config

REPO = Path(__file__).resolve().parent.parent
WORDS = ("apples rivers clocks stars bread rain chess trains music paint garden coffee winter ocean city books "
         "bright quiet slow warm old tiny happy strange green loud soft early late near far always never").split()
SPEAKERS = ["Ross", "Rachel", "Joey", "Monica"]


def _sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _guanaco_sources(tmp_path: Path, rng: random.Random) -> list[Path]:
    guanaco = [{"text": f"### Human: {_sentence(rng)} ### Assistant: {_sentence(rng)}"
                        f" ### Human: {_sentence(rng)} ### Assistant: {_sentence(rng)}"} for _ in range(40)]
    orca = [{"id": f"o{i}", "system_prompt": "You are a helpful assistant.", "question": _sentence(rng),
             "response": _sentence(rng, 12)} for i in range(30)]
    return [_write_jsonl(tmp_path / "guanaco.jsonl", guanaco), _write_jsonl(tmp_path / "orca.jsonl", orca)]


def _friends_corpus(tmp_path: Path, rng: random.Random) -> list[Path]:
    """A ConvoKit corpus directory: utterances.jsonl with speaker, text, conversation_id, reply_to, timestamp."""
    rows = []
    for c in range(8):
        for t in range(6):
            rows.append({"id": f"c{c}u{t}", "conversation_id": f"c{c}", "speaker": SPEAKERS[(c + t) % 4],
                         "text": _sentence(rng), "reply_to": f"c{c}u{t - 1}" if t else None, "timestamp": None})
    _write_jsonl(tmp_path / "friends-corpus" / "utterances.jsonl", rows)
    return [tmp_path / "friends-corpus"]


RECIPES = {  # recipe -> (tiny shape of the same architecture, data in the recipe's formats, GGUF export expected)
    "gpt-neo-1.3b-guanaco": ("tiny-gpt-neo", _guanaco_sources, False),  # llama.cpp has no GPT-Neo
    "dialogpt-friends": ("tiny-gpt2", _friends_corpus, True),
}


def _byte_level_tokenizer(texts: list[str]):
    """GPT-2's tokenizer family, trained here on the test's text: byte-level BPE, <|endoftext|>, no template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    assert tok.chat_template is None and "<|im_start|>" not in tok.get_vocab()
    return tok


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_runs_on_its_architecture_and_serves_with_the_training_prompt(recipe, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from chatbot.backends import GenerationParams, load_backend
    from chatbot.settings import load_settings
    from training.chat_format import encode_conversation
    from training.finetune import run
    from training.trainer.shapes import build_tiny_checkpoint

    shape, write_data, exports_gguf = RECIPES[recipe]
    rng = random.Random(0)
    sources = write_data(tmp_path / "data", rng)
    tok = _byte_level_tokenizer([_sentence(random.Random(s), 40) for s in range(50)] + [" ".join(SPEAKERS)])
    build_tiny_checkpoint(shape, tok, tmp_path / "base")

    cfg = load_config(REPO / "training" / "configs" / f"{recipe}.yaml")
    shipped_targets = list(cfg.lora.target_modules)
    assert len(cfg.data.sources) == len(sources)
    for src, path in zip(cfg.data.sources, sources):
        src.path = str(path)
    cfg = apply_overrides(cfg, {
        "model.name_or_path": str(tmp_path / "base"), "train.output_dir": str(tmp_path / "out"),
        "train.max_length": 128, "data.max_tokens": 128, "train.max_steps": 2,
        "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 1,
        "train.eval_steps": 2, "train.save_steps": 2, "train.report_to": "none"})
    summary = run(cfg)
    out = tmp_path / "out"
    assert summary["steps"] == 2

    # Every module type the recipe names got a LoRA pair: a wrong name for the architecture would fail here
    # (peft ignores a listed name as long as one other matches).
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    for name in shipped_targets:
        assert any(f".{name}.lora_A" in k for k in adapter), f"{recipe}: no LoRA on {name}"
    assert any("trainable_tokens" in k or "token_adapter" in k for k in adapter), "ChatML rows not trained"

    # GPT-2 (DialoGPT) exports to the recipe's GGUF; GPT-Neo cannot, and the run says why (captured log) and
    # still delivers the merged model, which the transformers backend serves.
    assert cfg.export.gguf and cfg.export.gguf_quants == ["q4_k_m"]
    if exports_gguf:
        assert summary["gguf_files"] == ["model-q4_k_m.gguf"], summary["gguf_files"]
    else:
        assert summary["gguf_files"] == []
        assert "[finetune] GGUF export skipped" in capsys.readouterr().out

    trained = AutoTokenizer.from_pretrained(out / "merged")
    assert trained.eos_token == "<|im_end|>"
    backend = load_backend(load_settings({"CHATBOT_BACKEND": "transformers", "CHATBOT_MODEL": str(out / "merged"),
                                          "CHATBOT_THREADS": "1"}))
    conv = [{"role": "user", "content": "Tell me about trains."}, {"role": "assistant", "content": "Trains are slow."}]
    served = list(backend._encode(conv[:1], return_dict=False))
    trained_ids = encode_conversation(trained, conv, max_length=128)["input_ids"]
    assert trained_ids[:len(served)] == served, "serving renders a different prompt than training trained on"
    assert backend.tokenizer.decode(served) == "<|im_start|>user\nTell me about trains.<|im_end|>\n" \
                                               "<|im_start|>assistant\n"
    chunks = list(backend.stream(conv[:1], GenerationParams(max_new_tokens=4, temperature=0.0)))
    assert chunks and chunks[-1].finish_reason in ("stop", "length")
    if not exports_gguf:
        return

    # The Space's backends on the export: llama.cpp renders the GGUF's template into the trained prompt, on the
    # batched path (the default) and the serial one (CHATBOT_PARALLEL=1).
    from chatbot.backends.llama_cpp import extra_buffers

    for parallel in ("4", "1"):
        with extra_buffers(False):
            gguf_backend = load_backend(load_settings({"CHATBOT_MODEL": str(out / "gguf"), "CHATBOT_THREADS": "1",
                                                       "CHATBOT_GGUF_FILE": "*q4_k_m.gguf",
                                                       "CHATBOT_PARALLEL": parallel}))
        fed = []
        if parallel == "1":
            complete = gguf_backend.llm.create_completion
            gguf_backend.llm.create_completion = lambda prompt, **kw: fed.append(list(prompt)) or complete(prompt, **kw)
        else:
            submit = gguf_backend.scheduler.submit
            gguf_backend.scheduler.submit = lambda job: fed.append(list(job.prompt)) or submit(job)
        chunks = list(gguf_backend.stream(conv[:1], GenerationParams(max_new_tokens=4, temperature=0.0)))
        assert fed == [served], f"CHATBOT_PARALLEL={parallel}"
        assert chunks[-1].finish_reason in ("stop", "length")
        getattr(gguf_backend, "close", lambda: None)()
