"""GGUF export (training/export_gguf.py): the export must behave like the HF model it came from.

Round trip (logits, greedy text), tokenizer parity (byte-level BPE and SentencePiece), chat-template parity
and stopping, and one clear ExportError per bad input. CPU only, nothing downloaded.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from training.export.gguf import QUANTS, ExportError, export_gguf  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Accents, emoji (incl. a ZWJ sequence), digits, code, whitespace runs, CJK and Cyrillic.
NASTY = ("Héllo wörld, naïve café — Ünïcödé! 😀🚀👍🏽 👩\u200d💻 12345 3.14159 1,000,000 0x1F\n"
         "def f(x):\n\tif x  >= 10:\n        return x**2  # säure\n\n\n   \t  trailing   \n"
         "日本語のテキスト Привет мир ¿Qué tal? I'm we'll they'D <b>html</b> {\"k\": [1, 2]}")
PROMPTS = ["The quick brown fox", "def main():\n    print(", "1 2 3 4 5 6", "Bonjour, ça va? 😀"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Two spinning threads on a shared 2-core CI box are many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_extra_cpu_buffers():
    """Load GGUFs without llama.cpp's extra CPU buffer types (AMX tiles / repacked weights), as the Space does.

    They are a load-time speed-up, not part of the file under test; and a llama-cpp-python built with
    GGML_NATIVE on a VM that advertises AMX without enabling it faults at `ldtilecfg` on the first
    quantised matmul (seen on the dev box, for the embedded Q4_1 model too).
    """
    from chatbot.backends.llama_cpp import extra_buffers

    with extra_buffers(False):
        yield


def _llama(path: Path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_batch=256, logits_all=False,
                           verbose=False, **kw)


def _last_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for the last position after evaluating `ids` from an empty context."""
    llm.reset()
    llm.eval(ids)
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def _greedy_llama(llm, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    llm.reset()
    llm.eval(ids)
    for _ in range(n):
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        nxt = int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))
        out.append(nxt)
        llm.eval([nxt])
    return out


def _greedy_hf(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _peaky_copy(src: Path, dst: Path, seed: int = 0, rope: dict | None = None) -> Path:
    """The fixture model with sharper logits and attention, and random q/k/v biases.

    A freshly initialised model (std 0.02) has nearly flat logits (the top two of 49k tokens differ by
    ~1e-3, so q8_0 rounding flips greedy ties) and nearly uniform attention (so a wrong rope or q/k
    permutation barely moves the logits). Scaling the final norm x16 spreads the logits without touching
    the residual stream; scaling q/k x8 makes attention depend sharply on positions. HF initialises
    biases to zero, which would hide a lost Qwen2 bias. The architecture is unchanged, so a mismatch
    after export means a conversion error, not noise.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = transformers.AutoConfig.from_pretrained(src)
    if rope:
        config.rope_parameters = {**config.rope_parameters, **rope}
    model = AutoModelForCausalLM.from_pretrained(src, config=config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    gpt2 = config.model_type == "gpt2"
    with torch.no_grad():
        (model.transformer.ln_f if gpt2 else model.model.norm).weight.mul_(16.0)
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
            elif name.endswith("c_attn.weight"):  # GPT-2's fused Conv1D (in, 3 x hidden): the q and k columns
                p[:, :2 * p.shape[0]].mul_(8.0)
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) or \
                    (gpt2 and name.endswith(".bias") and ".ln_" not in name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


# Llama-3.x rope scaling, with an original context short enough that most frequencies are rescaled.
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_qwen2_dir", "llama3_rope", "tiny_gpt2_dir"])
def tiny_export(request, tmp_path_factory):
    """(hf model dir, f16 gguf, q8_0 gguf) for a tiny Llama, Qwen2, Llama with llama3 rope and GPT-2 (DialoGPT)."""
    src = request.getfixturevalue("tiny_llama_dir" if request.param == "llama3_rope" else request.param)
    root = tmp_path_factory.mktemp(request.param)
    model_dir = _peaky_copy(src, root / "merged", rope=LLAMA3_ROPE if request.param == "llama3_rope" else None)
    metadata = {"general.base_model": "test/tiny", "datasets": ["a/b", "local.jsonl"], "license": "apache-2.0"}
    f16, q8 = export_gguf(model_dir, root / "gguf", ["f16", "q8_0"], metadata, progress=False, threads=1)
    return model_dir, f16, q8


def test_round_trip_f16_logits_and_q8_greedy(tiny_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, f16, q8 = tiny_export
    assert f16.name == "model-f16.gguf" and q8.name == "model-q8_0.gguf"
    assert q8.stat().st_size < 0.7 * f16.stat().st_size  # really quantised, not a copy
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm16 = _llama(f16)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].numpy()
        got = _last_logits(llm16, ids)
        scale = float(np.abs(ref).max())
        # f16 weights: <1e-3 of the logit range; a wrong q/k permutation or rope gives >1e-1 (checked by hand).
        assert np.abs(got - ref).max() <= 1e-2 * scale, prompt
        assert int(got.argmax()) == int(ref.argmax())
    llm8 = _llama(q8)
    for prompt in PROMPTS[:2]:
        ids = tok.encode(prompt)
        assert _greedy_llama(llm8, ids, 16) == _greedy_hf(model, ids, 16), prompt


def test_round_trip_metadata(tiny_export):
    from transformers import AutoConfig, AutoTokenizer

    model_dir, f16, _ = tiny_export
    cfg = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    meta = llama_cpp.Llama(model_path=str(f16), vocab_only=True, verbose=False).metadata  # scalar keys, as str

    arch = meta["general.architecture"]
    assert arch == {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}[cfg.model_type]
    assert int(meta[f"{arch}.context_length"]) == cfg.max_position_embeddings
    if arch == "gpt2":  # LayerNorm and learned positions
        assert float(meta["gpt2.attention.layer_norm_epsilon"]) == pytest.approx(cfg.layer_norm_epsilon)
        assert int(meta["gpt2.feed_forward_length"]) == 4 * cfg.hidden_size
    else:
        assert int(meta[f"{arch}.attention.head_count_kv"]) == cfg.num_key_value_heads
        assert float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]) == pytest.approx(cfg.rms_norm_eps)
        assert float(meta[f"{arch}.rope.freq_base"]) == cfg.rope_parameters["rope_theta"]
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id
    assert int(meta["tokenizer.ggml.eot_token_id"]) == tok.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.ggml.add_bos_token"] == "false"  # this tokenizer adds no BOS; llama.cpp must not either
    assert meta["general.base_model.0.name"] == "test/tiny"
    assert meta["general.base_model.0.repo_url"] == "https://huggingface.co/test/tiny"
    assert (meta["general.dataset.0.name"], meta["general.dataset.1.name"]) == ("a/b", "local.jsonl")
    assert meta["general.license"] == "apache-2.0"
    if arch != "gpt2" and cfg.rope_parameters.get("rope_type") == "llama3":
        from gguf import GGUFReader

        assert "rope_freqs.weight" in {t.name for t in GGUFReader(f16).tensors}


def test_tokenizer_parity_byte_level_bpe(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    (path,) = export_gguf(tiny_llama_dir, tmp_path, ["f16"], progress=False, threads=1)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in (NASTY, "  leading spaces", "x" * 40 + "  \n\n  " + "9" * 17):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, add_special_tokens=False)
    # special tokens are parsed as one id, as HF does
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat, add_special_tokens=False)


SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny SentencePiece model.",
    "def add(a, b):\n    return a + b", "Numbers 0 1 2 3 4 5 6 7 8 9 and 3.14", "Café naïve résumé über straße",
    "Tokenizers split text into pieces; llama.cpp must split it the same way.",
] * 20


def _sentencepiece_model_dir(tmp_path: Path, keep_model_file: bool) -> Path:
    """A tiny Llama with its own freshly trained SentencePiece BPE tokenizer (Llama-2 style settings).

    transformers 5 converts a tokenizer.model through protobuf, which is not installed; the conversion
    is done here the way its SentencePieceExtractor does it: pieces in id order + generate_merges.
    """
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    from training.trainer.shapes import build_tiny_checkpoint

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS), model_writer=buf, vocab_size=512, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=True, add_bos_token=True)
    tok.chat_template = ("{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}[assistant] {% endif %}")
    for text in SP_CORPUS[:6]:  # the wrapper really is the trained SentencePiece model
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
    out = build_tiny_checkpoint("tiny-llama", tok, tmp_path / "sp-llama")
    if keep_model_file:
        (out / "tokenizer.model").write_bytes(buf.getvalue())
    return out, sp


@pytest.mark.parametrize("keep_model_file", [True, False], ids=["tokenizer.model", "tokenizer.json-only"])
def test_tokenizer_parity_sentencepiece(tmp_path, keep_model_file):
    from transformers import AutoTokenizer

    model_dir, sp = _sentencepiece_model_dir(tmp_path, keep_model_file)
    tok = AutoTokenizer.from_pretrained(model_dir)
    (path,) = export_gguf(model_dir, tmp_path / "gguf", ["f16"], progress=False, threads=1)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.ggml.model"] == "llama"
    for text in (NASTY, "Hello world", "a    b   c", "tabs\t\tand\n\nnewlines  "):
        hf = tok.encode(text, add_special_tokens=True)
        assert hf[0] == tok.bos_token_id
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == hf, text
    # Text that starts with spaces: transformers' Metaspace skips the dummy "▁" prefix when the text already
    # starts with a space, SentencePiece (and llama.cpp) always add it; llama.cpp must follow SentencePiece.
    for text in ("  two leading spaces", "   x"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text), text
    assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id


# --- SmolLM2: the real model, from the embedded GGUF, through transformers, back to GGUF -------------------

@pytest.fixture(scope="module")
def smollm2_export(smollm2_gguf, smollm2_tokenizer_dir, tmp_path_factory):
    """SmolLM2-135M-Instruct dequantised into transformers, saved as a merged dir, re-exported at f16."""
    from transformers import AutoTokenizer

    from training.trainer.modeling import load_gguf_model

    root = tmp_path_factory.mktemp("smollm2")
    # The same plain fp32 rebuild the CPU recipe trains on (a GGUF-loaded model refuses save_pretrained).
    model = load_gguf_model(smollm2_gguf.parent, smollm2_gguf.name)
    model.save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir).save_pretrained(root / "merged")
    (path,) = export_gguf(root / "merged", root / "gguf", ["f16"],
                          {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "datasets": ["none"]}, progress=False, threads=1)
    return root / "merged", model.eval(), path


@pytest.mark.slow
def test_smollm2_reexport_greedy_matches_transformers(smollm2_export):
    from transformers import AutoTokenizer

    model_dir, model, path = smollm2_export
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = _llama(path)
    for text in ("The capital of France is", "def fibonacci(n):"):
        ids = tok.encode(text)
        hf = _greedy_hf(model, ids, 16)
        assert _greedy_llama(llm, ids, 16) == hf, (text, tok.decode(hf))


@pytest.mark.slow
def test_template_parity_and_stop_on_end_of_turn(smollm2_export):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    model_dir, _, path = smollm2_export
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = _llama(path)
    assert llm.chat_format == "chat_template.default"  # create_chat_completion uses the exported template
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France? One word."}]
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                    eos_token=llm._model.token_get_text(llm.token_eos()),
                                    bos_token=llm._model.token_get_text(llm.token_bos()))
    rendered = formatter(messages=messages).prompt
    assert rendered == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    hf_ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == list(hf_ids)

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, im_end)
    out = llm.create_chat_completion(messages=messages, max_tokens=48, temperature=0.0, seed=0)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert "Paris" in choice["message"]["content"]
    assert "<|im_end|>" not in choice["message"]["content"]


# --- bad input ---------------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path, keep) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if keep(f.name):
            shutil.copy(f, dst / f.name)
    return dst


def test_bad_input_no_weights(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m", lambda n: not n.endswith(".safetensors"))
    with pytest.raises(ExportError, match="safetensors"):
        export_gguf(d, tmp_path / "out")


def test_bad_input_no_tokenizer(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m", lambda n: not n.startswith(("tokenizer", "chat_template")))
    with pytest.raises(ExportError, match="no tokenizer"):
        export_gguf(d, tmp_path / "out")


def test_bad_input_unsupported_architecture(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m", lambda n: True)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neo", "architectures": ["GPTNeoForCausalLM"]}))
    # GPT-Neo has no llama.cpp architecture at all: it is served by the transformers backend.
    with pytest.raises(ExportError, match="'gpt_neo'.*CHATBOT_BACKEND=transformers"):
        export_gguf(d, tmp_path / "out")


def test_bad_input_unknown_quant(tiny_llama_dir, tmp_path):
    with pytest.raises(ExportError, match="'q4_k_x'.*accepted: .*q4_k_m") as err:
        export_gguf(tiny_llama_dir, tmp_path / "out", ["q8_0", "q4_k_x"])
    assert not (tmp_path / "out").exists()  # checked before any work
    assert "q4_k_m" in QUANTS and "\n" not in str(err.value)


def test_no_quant_asked_for_is_said_as_such(tiny_llama_dir, tmp_path, capsys):
    """`--export.gguf_quants []` in a run skips the export saying why, not as an unknown quant; the library call with
    no quant names what it could have asked for."""
    from training.config import TrainConfig, apply_overrides
    from training.finetune import export_gguf_step

    cfg = apply_overrides(TrainConfig(), {"export.gguf": True, "export.gguf_quants": "[]"})
    assert cfg.export.gguf_quants == [] and export_gguf_step(cfg, tiny_llama_dir, tmp_path) == []
    assert capsys.readouterr().out.strip() == ("[finetune] GGUF export skipped: no quant asked for "
                                               "(export.gguf_quants is empty)")
    with pytest.raises(ExportError, match="none asked for; name one or more of: .*q4_k_m") as err:
        export_gguf(tiny_llama_dir, tmp_path / "out", [])
    assert "unknown" not in str(err.value) and not (tmp_path / "out").exists()


def test_bad_input_lora_adapter_dir(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ExportError, match="LoRA adapter.*merge_and_unload"):
        export_gguf(tmp_path / "adapter", tmp_path / "out")
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "adapter")  # a run dir with the base config beside
    with pytest.raises(ExportError, match="LoRA adapter.*training/finetune.py"):
        export_gguf(tmp_path / "adapter", tmp_path / "out")


def test_cli_exits_2_with_one_line_error(tiny_llama_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "training" / "export_gguf.py"), "--model", str(tiny_llama_dir),
                           "--out", str(tmp_path), "--quant", "q9_9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "q9_9" in lines[0] and "q4_k_m" in lines[0]


def test_cli_writes_named_quants(tiny_llama_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "training" / "export_gguf.py"), "--model", str(tiny_llama_dir),
                           "--out", str(tmp_path), "--quant", "Q4_K_M", "q8_0", "--adapter", "runs/x/adapter", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["model-q4_k_m.gguf", "model-q8_0.gguf"]
    assert "model-q4_k_m.gguf" in proc.stdout and "MiB" in proc.stdout
    assert not list(tmp_path.glob(".*tmp*"))  # the intermediate f16 is removed
    meta = llama_cpp.Llama(model_path=str(tmp_path / "model-q4_k_m.gguf"), vocab_only=True, verbose=False).metadata
    assert meta["general.adapter"] == "runs/x/adapter"
    assert int(meta["general.file_type"]) == int(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
