"""Write training/samples/sample.jsonl: short chats about this kit (fine-tuning, LoRA, GGUF, llama.cpp, Spaces).

One consistent voice (a direct answer first, then at most one concrete tip), several wordings per question,
some system prompts, some two-turn follow-ups, and a few deliberate exact and near duplicates so the dedup
options show an effect. Deterministic: rerunning rewrites the same file.

    python training/samples/make_sample.py           # also writes the small per-format examples in examples/
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (questions in different wordings, the answer). Answers: direct, concise, one tip at most.
TOPICS: list[tuple[list[str], str]] = [
    (["What is fine-tuning?", "Can you explain fine-tuning in one sentence?", "What does fine-tuning a model mean?",
      "Fine-tuning: what is it?"],
     "Fine-tuning continues training a pretrained model on your own examples so it adopts their task and style. "
     "It needs far less data and compute than training from scratch."),
    (["What is LoRA?", "Explain LoRA briefly.", "How does LoRA work?", "What does LoRA stand for?"],
     "LoRA (low-rank adaptation) freezes the base weights and trains two small matrices per layer whose product "
     "is added to the frozen weight. Only those adapters are trained and saved, usually a few MB."),
    (["What is QLoRA?", "How is QLoRA different from LoRA?", "Explain QLoRA.", "What does the Q in QLoRA mean?"],
     "QLoRA is LoRA on top of a base model loaded in 4-bit NF4. The frozen weights take a quarter of the memory, "
     "while the adapters still train in 16-bit."),
    (["What does the LoRA rank r control?", "What is r in a LoRA config?", "How should I pick the LoRA rank?",
      "Does a higher LoRA rank help?"],
     "The rank r is the inner size of the adapter matrices: higher r means more trainable parameters and "
     "capacity. r=16 is a good default; go to 32 or 64 only if the eval loss stalls."),
    (["What is lora_alpha?", "What does alpha do in LoRA?", "How do I set LoRA alpha?",
      "Should alpha equal the rank?"],
     "lora_alpha scales the adapter output by alpha/r. Setting alpha equal to r keeps the scale at 1, which is "
     "what the reference recipe does (r=16, alpha=16)."),
    (["Which layers should LoRA target?", "What are target_modules?", "Should I apply LoRA to all linear layers?",
      "Is attention-only LoRA enough?"],
     "Target all linear layers (attention and MLP projections). It costs a little more memory than attention-only "
     "LoRA but usually reaches a lower loss."),
    (["What is LoRA dropout?", "Should I use dropout in LoRA?", "Why is lora_dropout 0 in the recipe?",
      "Does LoRA dropout matter?"],
     "LoRA dropout randomly zeroes adapter inputs during training. With one epoch on a decent data set it rarely "
     "helps, so the recipe uses 0, which is also faster."),
    (["What is NF4?", "What does nf4 quantization mean?", "Why load the base model in NF4?",
      "What is 4-bit NormalFloat?"],
     "NF4 (4-bit NormalFloat) is a 4-bit data type whose levels follow a normal distribution, matching how "
     "weights are spread. bitsandbytes uses it to load the frozen base model for QLoRA."),
    (["What is double quantization?", "What does bnb_4bit_use_double_quant do?", "Explain double quant.",
      "Is double quantization worth it?"],
     "Double quantization also quantizes the scaling constants of the 4-bit blocks. It saves about 0.4 bits per "
     "parameter at no visible cost in quality, so keep it on."),
    (["Why use bf16 compute with 4-bit weights?", "What is bnb_4bit_compute_dtype?",
      "Which compute dtype for QLoRA?", "Should compute be bf16 or fp16?"],
     "The 4-bit weights are unpacked to the compute dtype for each matmul. Use bf16 on GPUs that support it: it has "
     "the range of fp32 and avoids fp16 overflow."),
    (["Can I fine-tune without a GPU?", "Does fine-tuning work on CPU?", "Is there a CPU recipe?",
      "How do I train on my laptop?"],
     "Yes, small models train on CPU in fp32 LoRA. Run python training/finetune.py --config "
     "training/configs/smollm2-135m-cpu.yaml; it takes a few minutes on two cores."),
    (["How do I start a fine-tuning run?", "What command runs the training?", "How do I launch finetune.py?",
      "Which command fine-tunes a model?"],
     "Run python training/finetune.py --config training/configs/<recipe>.yaml. Any option can be overridden on "
     "the command line, for example --learning_rate 1e-4."),
    (["How do I resume an interrupted run?", "My training crashed, can I continue?", "What does --resume do?",
      "How do I continue from a checkpoint?"],
     "Rerun the same command with --resume. It continues from the newest checkpoint in the output directory with "
     "the same data order, instead of starting over."),
    (["How often are checkpoints saved?", "What is save_steps?", "How do I change the checkpoint interval?",
      "When does the trainer write a checkpoint?"],
     "Every save_steps optimizer steps, 1,250 by default. Lower it on unreliable machines so a crash loses less "
     "work."),
    (["What learning rate should I use for LoRA?", "Is 2e-4 a good learning rate?",
      "Which learning rate for QLoRA?", "How high can the LoRA learning rate be?"],
     "2e-4 is a solid default for LoRA and QLoRA. If the loss spikes or diverges, halve it; if it barely moves, "
     "try 3e-4."),
    (["What is gradient accumulation?", "Why use grad accumulation?", "What does gradient_accumulation_steps do?",
      "How do I get a bigger batch without more memory?"],
     "Gradient accumulation sums gradients over several small batches before one optimizer step. Batch 2 with "
     "accumulation 4 trains like batch 8 with the memory of batch 2."),
    (["What is the effective batch size?", "How do I compute the effective batch size?",
      "What batch size does the reference recipe use?", "Batch size times what?"],
     "Effective batch = per-device batch x gradient accumulation x number of GPUs. The reference recipe uses "
     "2 x 4 = 8 on one GPU."),
    (["What is warmup?", "Why use learning rate warmup?", "What do warmup steps do?", "Do I need warmup?"],
     "Warmup raises the learning rate from zero over the first steps, so early large gradients do not wreck the "
     "model. A few percent of the steps is enough."),
    (["What is gradient checkpointing?", "Why enable gradient checkpointing?",
      "Does gradient checkpointing slow training?", "How do I save activation memory?"],
     "Gradient checkpointing drops activations in the forward pass and recomputes them in the backward pass. It "
     "cuts memory a lot for about 20-30% more compute."),
    (["What is 8-bit Adam?", "Why use adamw 8-bit?", "What does optim adamw_8bit change?",
      "Does the optimizer need much memory?"],
     "8-bit AdamW stores the optimizer's two moment buffers in 8 bits instead of 32. With LoRA the saving is "
     "small but free, so the GPU recipes use it."),
    (["How many epochs should I train?", "Is one epoch enough?", "Should I train for several epochs?",
      "How long should fine-tuning run?"],
     "One epoch is usually enough for instruction data of tens of thousands of rows. More epochs on small data "
     "overfit: watch the eval loss and stop when it rises."),
    (["What is eval loss?", "Why does the run report eval loss?", "What does the validation loss tell me?",
      "Train loss vs eval loss?"],
     "Eval loss is the loss on held-out rows the model never trains on. It tells you whether the model "
     "generalises; train loss alone can fall while the model only memorises."),
    (["How do I know if I am overfitting?", "My train loss drops but eval loss rises, why?",
      "What are signs of overfitting?", "How do I detect overfitting?"],
     "Overfitting shows as train loss still falling while eval loss rises. Use fewer epochs, more data, or a lower "
     "learning rate."),
    (["What is a chat template?", "Why does the chat template matter?", "What does apply_chat_template do?",
      "Where does the prompt format come from?"],
     "A chat template is the Jinja snippet in the tokenizer that turns a list of messages into the exact prompt "
     "text the model was trained on. Always use the model's own template, never a hand-written format."),
    (["What if my base model has no chat template?", "My tokenizer has no chat_template, what now?",
      "Can I add a chat template to a base model?", "Which template does a base model use?"],
     "The recipe names a template, and it is saved into the output tokenizer. Serving then uses the very same "
     "template the model was trained with."),
    (["Why is the loss only on assistant tokens?", "What does assistant-only loss mean?",
      "Should the model learn the user's text?", "What is label masking?"],
     "Only assistant tokens get labels; system and user tokens are set to -100 and ignored. The model learns to "
     "answer, not to imitate the user."),
    (["Why must pad differ from eos?", "What goes wrong if pad equals eos?", "How does the model learn to stop?",
      "My model never stops generating, why?"],
     "If padding reuses the eos token and padding is masked, eos is masked too and the model never learns to stop. "
     "Keep eos in the labels or use a separate pad token."),
    (["What is a token?", "How are tokens different from words?", "What does a tokenizer do?",
      "How many tokens is a word?"],
     "A token is a piece of text from the tokenizer's vocabulary, often a word part. English averages about four "
     "characters per token."),
    (["What is max length?", "What does max_length 2048 mean?", "What happens to longer conversations?",
      "How long can a training example be?"],
     "max_length caps tokens per example. Longer ones are truncated, and an example whose assistant tokens are "
     "all cut off is dropped and counted, never trained on."),
    (["Which data formats are supported?", "Can I use ShareGPT data?", "What dataset shapes can I train on?",
      "Does the kit read Alpaca files?"],
     "ShareGPT, OpenAI messages, Alpaca, OpenOrca, guanaco text and dialogue transcripts, from jsonl, json, csv, "
     "parquet or a Hub dataset id. Everything is normalised to messages."),
    (["What happens to malformed rows?", "Does a bad row crash the run?", "What if my data has broken rows?",
      "Are invalid rows skipped?"],
     "Malformed rows are skipped and counted by reason, and the run prints a summary. It fails only if no usable "
     "row is left."),
    (["Why deduplicate training data?", "What does dedup do?", "Should I remove duplicate rows?",
      "Do duplicates hurt fine-tuning?"],
     "Duplicates make the model memorise a few rows and waste compute. Exact dedup is cheap and almost always "
     "worth it."),
    (["What is near-duplicate removal?", "How are near duplicates found?", "What is MinHash dedup?",
      "What does near_dedup 0.85 mean?"],
     "Near-dedup drops rows whose character shingles overlap an earlier row's by at least the Jaccard threshold, "
     "found with MinHash and LSH buckets. 0.85 removes rewordings but keeps distinct rows."),
    (["What is the score column in FineTome?", "How does min_score work?", "Can I filter by quality score?",
      "What does min_score 4 do?"],
     "FineTome rates each row with a quality score. min_score drops rows below the threshold; sources without a "
     "score column are left alone."),
    (["How do I mix two datasets?", "What does a source weight do?", "Can I combine several datasets?",
      "How do I upsample one dataset?"],
     "List several sources with a weight each. Weight 2 repeats a source twice, 0.5 keeps a seeded half; "
     "max_rows then caps the mix."),
    (["How is the validation split made?", "Is the train/validation split random?", "What is validation_fraction?",
      "Can I use my own validation file?"],
     "A seeded fraction of each source is held out, 5% by default, before any filter. Set validation_path to use "
     "a fixed file instead."),
    (["What is the data report?", "Where do I see data statistics?", "What is data_report.json?",
      "Does the kit plot token lengths?"],
     "Each run writes data_report.json with rows per source and drops by reason, plus data_lengths.png, a "
     "histogram of token lengths."),
    (["What is GGUF?", "What is a GGUF file?", "Why convert a model to GGUF?", "What does GGUF contain?"],
     "GGUF is llama.cpp's single-file model format: weights, tokenizer and chat template in one file. It loads "
     "fast and supports many quantization types."),
    (["What is llama.cpp?", "Why serve with llama.cpp?", "What does llama.cpp do?", "Is llama.cpp fast on CPU?"],
     "llama.cpp is a C/C++ inference engine for LLMs, tuned for CPUs. It runs quantized GGUF models quickly on "
     "modest hardware, which suits a free Space."),
    (["What is llama-cpp-python?", "How does Python call llama.cpp?", "What are the llama-cpp-python bindings?",
      "Which package wraps llama.cpp?"],
     "llama-cpp-python wraps llama.cpp for Python, including an OpenAI-style chat completion API with streaming. "
     "The Space uses it to serve GGUF models."),
    (["What does Q4_K_M mean?", "Which quantization should I pick?", "Q4_K_M or Q8_0?",
      "What is the best GGUF quant for CPU?"],
     "Q4_K_M is 4-bit k-quant with medium mixing, the usual size and quality balance. Q8_0 is nearly lossless but "
     "twice the size; Q4_K_M is the pick for CPU serving."),
    (["How do I convert a merged model to GGUF?", "How do I export GGUF?", "What converts safetensors to GGUF?",
      "How do I make a GGUF from my fine-tune?"],
     "Merge the adapter into the base first, then convert the merged checkpoint with llama.cpp's "
     "convert_hf_to_gguf.py and quantize the result, for example to Q4_K_M."),
    (["Why merge the adapter into the base model?", "What is a merged model?", "Should I ship the adapter or the "
      "merged model?", "What does merging LoRA do?"],
     "Merging adds the LoRA update into the base weights, giving a plain checkpoint with no adapter overhead. "
     "GGUF conversion and llama.cpp need the merged model."),
    (["Can I merge LoRA into the 4-bit model?", "Why not merge into the quantized weights?",
      "Which base do I merge into?", "How is the merged model built after QLoRA?"],
     "No: merging into 4-bit weights loses precision. The kit merges into a full-precision copy of the base and "
     "saves it in 16-bit."),
    (["What is a Hugging Face Space?", "What is a Space?", "Where does the chatbot run?", "What are HF Spaces?"],
     "A Space is a git repository on the Hugging Face Hub that runs an app, such as a Gradio chatbot, on hosted "
     "hardware. The free tier gives 2 CPU cores."),
    (["Can a Space run without a GPU?", "Does the chatbot need a GPU?", "Is CPU enough for the Space?",
      "How does the Space run on free hardware?"],
     "Yes: the Space serves a small quantized GGUF with llama.cpp on CPU. Small models answer in real time on the "
     "free 2-core tier."),
    (["What is Gradio?", "Why Gradio for the chatbot?", "What does Gradio do?", "Is Gradio good for chat apps?"],
     "Gradio is a Python library for web UIs around models. Its ChatInterface gives a streaming chatbot in a few "
     "lines, and Spaces run it natively."),
    (["Why stream the answer?", "What is token streaming?", "Does the chatbot stream tokens?",
      "Why show tokens as they arrive?"],
     "Streaming shows each token as it is generated, so users see the answer start within a second instead of "
     "waiting for the whole reply."),
    (["How do I upload my model to the Hub?", "What does --push-to-hub do?", "How do I publish the fine-tune?",
      "Can the run upload results?"],
     "Add --push-to-hub USER/NAME. The run uploads the adapter, the merged model and a generated model card, using "
     "the token in HF_TOKEN."),
    (["Where do I put my Hugging Face token?", "How is HF_TOKEN used?", "Is my token printed in logs?",
      "How do I authenticate uploads?"],
     "Set the HF_TOKEN environment variable. The kit reads it for uploads and never prints it."),
    (["What is --push-checkpoints?", "Can checkpoints go to the Hub?", "How do I protect against losing the "
      "machine?", "Should I upload checkpoints?"],
     "--push-checkpoints uploads each checkpoint as it is saved, so losing a rented machine costs at most one "
     "checkpoint interval."),
    (["What is in the run directory?", "What files does a run write?", "What are the training outputs?",
      "Where is the adapter saved?"],
     "The run directory holds the LoRA adapter, the merged 16-bit model, the tokenizer with its template, "
     "summary.json and a loss-curve PNG."),
    (["What is summary.json?", "Where are the training metrics?", "Does the run record tokens per second?",
      "How do I see peak memory?"],
     "summary.json records steps, the train and eval loss curves, tokens/s, peak memory, wall time and the full "
     "config of the run."),
    (["What is SmolLM2?", "Which small model does the kit use?", "What is SmolLM2-135M?",
      "Why start from SmolLM2?"],
     "SmolLM2-135M-Instruct is a 135M-parameter chat model. It is small enough to train and serve on CPU, so the "
     "kit uses it for its CPU recipe and default Space model."),
    (["Which model for the GPU recipe?", "What does the reference recipe train?", "Why Llama 3.2 1B?",
      "Which base model is the default on GPU?"],
     "The reference recipe fine-tunes Llama 3.2 1B with QLoRA on FineTome. It fits a single consumer GPU and "
     "still chats well after quantization."),
    (["How much GPU memory does QLoRA need for 1B?", "Can I train 1B on a small GPU?",
      "What GPU do I need for the 3B recipe?", "How much VRAM for QLoRA?"],
     "A 1B model in QLoRA trains in a few GB at batch 2 with gradient checkpointing; 3B fits in about 8-10 GB. "
     "The run records peak memory in summary.json."),
    (["What is FineTome?", "What is FineTome-100k?", "Why train on FineTome?", "Which dataset does the reference "
      "recipe use?"],
     "FineTome-100k is a ShareGPT-style instruction set of 100k conversations with a quality score per row. The "
     "reference recipe trains on it."),
    (["What is the guanaco dataset?", "What format is guanaco?", "How is guanaco text parsed?",
      "What does ### Human mean?"],
     "Guanaco stores each conversation as one text with ### Human: and ### Assistant: markers. The kit splits it "
     "at the markers into user and assistant turns."),
    (["How do I train on TV dialogue?", "Can I fine-tune on transcripts?", "What does assistant_speaker do?",
      "How are dialogue windows built?"],
     "Dialogue rows become windows of consecutive utterances; the chosen assistant_speaker is the assistant and "
     "the others are the user, named in the text."),
    (["What is the OpenOrca format?", "How is OpenOrca converted?", "What are system_prompt, question and "
      "response?", "Can I mix OpenOrca into training?"],
     "OpenOrca rows have system_prompt, question and response. They become a system, a user and an assistant "
     "message."),
    (["What is the Alpaca format?", "How is Alpaca data converted?", "What do instruction and input mean?",
      "Where does the Alpaca input go?"],
     "Alpaca rows have instruction, optional input and output. Instruction and input become the user message, "
     "output the assistant's."),
    (["What is TRL?", "What does SFTTrainer do?", "Which trainer does the kit use?",
      "Does the kit write its own training loop?"],
     "TRL is Hugging Face's library for training language models; its SFTTrainer runs supervised fine-tuning on "
     "top of transformers' Trainer. The kit uses it instead of a hand-written loop."),
    (["What is PEFT?", "Which library provides LoRA?", "What does peft do?", "How are adapters saved?"],
     "PEFT is Hugging Face's library for parameter-efficient fine-tuning; it adds LoRA adapters to a transformers "
     "model and saves them separately from the base."),
    (["What is bitsandbytes?", "Why is bitsandbytes needed?", "Does 4-bit loading need CUDA?",
      "What if bitsandbytes is missing?"],
     "bitsandbytes provides the 4-bit and 8-bit kernels behind QLoRA and 8-bit Adam. It needs CUDA; without it the "
     "kit falls back to bf16 or fp32 LoRA."),
    (["Can I train on several GPUs?", "Does the kit support DDP?", "How do I use accelerate launch?",
      "Does torchrun work?"],
     "Yes: launch the same command with accelerate launch or torchrun and each GPU trains on its shard of the data "
     "with DDP. Nothing in the config changes."),
    (["What is tokens per second?", "How fast is training?", "How do I measure training throughput?",
      "What does tokens/s mean in the summary?"],
     "Tokens per second counts training tokens processed per second of wall time. Compare it across runs on the "
     "same hardware, not across machines."),
    (["Should I use W&B or TensorBoard?", "How do I log to TensorBoard?", "What does report_to do?",
      "Can I track runs in Weights & Biases?"],
     "Set report_to to tensorboard or wandb; either is used when installed. The loss curve PNG and summary.json "
     "are written regardless."),
    (["What is a seed?", "Why set a seed?", "Are runs reproducible?", "What does seed 42 do?"],
     "The seed fixes the random choices: data split, mixing, shuffling and initialisation. Same seed and data "
     "give the same run, which makes ablations fair."),
    (["What is an ablation?", "How do I compare data settings?", "How do I test if dedup helps?",
      "How should I run a data sweep?"],
     "Change one setting at a time, such as dedup or min_score, and compare eval loss on the same validation rows. "
     "The kit holds validation out before the filters for that reason."),
    (["Why is my loss NaN?", "Training loss became NaN, what now?", "What causes NaN loss?",
      "My loss exploded, why?"],
     "NaN loss usually means the learning rate is too high or fp16 overflowed. Lower the learning rate and use bf16 "
     "instead of fp16."),
    (["Why is my loss not going down?", "The loss is flat, what should I check?", "Training is not learning, why?",
      "The loss barely moves, help?"],
     "Check that labels are not all -100, that the chat template matches the model, and that the learning rate is "
     "not too small. The data report shows rows that were dropped."),
    (["What temperature should the chatbot use?", "What does temperature do?", "How do I make answers less "
      "random?", "Is a low temperature better?"],
     "Temperature scales randomness when sampling: 0 is greedy and repeatable, around 0.7 is varied but sensible. "
     "Small models do better at 0.2-0.7."),
    (["What is top_p?", "What does nucleus sampling do?", "Should I change top_p?", "What is top-p sampling?"],
     "top_p samples only from the smallest set of tokens whose probabilities add up to p. 0.9 is a good default "
     "that cuts off unlikely tokens."),
    (["What is the context window?", "What is n_ctx?", "How long can a chat be?", "What limits conversation "
      "length?"],
     "The context window is how many tokens the model sees at once; n_ctx sets it in llama.cpp. Longer chats drop "
     "the oldest turns to fit."),
    (["Why does a bigger model answer slower on CPU?", "How fast is a 1B model on CPU?",
      "How many tokens per second on the Space?", "Is 3B too slow for free CPU?"],
     "CPU generation is limited by memory bandwidth, so speed falls roughly with model size in bytes. A 4-bit 1B "
     "model streams comfortably on 2 cores; 3B is slower but usable."),
    (["How do I point the Space at my model?", "How do I serve my fine-tune?", "Can the Space load my GGUF?",
      "How does the Space pick a model?"],
     "Upload the GGUF to the Hub, then set the Space's model variables to that repository and file. The model card "
     "of each run lists the exact values."),
    (["What is a model card?", "What goes in the model card?", "Does the run write a README for the Hub?",
      "Why write a model card?"],
     "A model card is the README of a Hub model. The kit writes one with the base model, data and filters, "
     "hyperparameters, eval loss and how to serve it."),
    (["What is perplexity?", "How does perplexity relate to loss?", "What does a loss of 2 mean?",
      "Is lower loss better?"],
     "Perplexity is exp(loss): a loss of 2.0 is a perplexity of about 7.4. Lower is better, but compare only on "
     "the same validation rows and tokenizer."),
    (["How much data do I need?", "Is 1,000 examples enough?", "How many rows for fine-tuning?",
      "Can I fine-tune with little data?"],
     "A few hundred clean examples can teach a style; a new skill needs thousands. Quality beats quantity, so "
     "filter before adding more."),
    (["Why filter by length?", "What do min_tokens and max_tokens do?", "Should I drop very long rows?",
      "Should I drop very short rows?"],
     "Length filters drop rows outside a token range, measured with the chat template applied. Very long rows "
     "get truncated anyway; very short ones teach little."),
]

SYSTEM_PROMPTS = [
    "You are the assistant of a fine-tuning kit. Answer briefly and concretely.",
    "You help people fine-tune and serve small language models. Be concise.",
    "You are a concise expert on LoRA, GGUF and Hugging Face Spaces.",
    "Answer questions about training and serving small LLMs in two sentences or fewer.",
]

# Follow-up wordings for the second user turn of a two-turn chat.
FOLLOW_UPS = ["And {q}", "Thanks. {Q}", "OK. {Q}", "Got it. {Q}", "One more: {q}", "{Q}"]

# Related topics for two-turn chats: indexes into TOPICS, filled in by keyword below.
PAIRS = [("What is LoRA?", "What is QLoRA?"), ("What is QLoRA?", "What is NF4?"),
         ("What is GGUF?", "What does Q4_K_M mean?"), ("What is llama.cpp?", "What is llama-cpp-python?"),
         ("What is a Hugging Face Space?", "Can a Space run without a GPU?"),
         ("What is fine-tuning?", "What is LoRA?"), ("How do I start a fine-tuning run?",
                                                      "How do I resume an interrupted run?"),
         ("What is gradient accumulation?", "What is the effective batch size?"),
         ("What is eval loss?", "How do I know if I am overfitting?"),
         ("What is a chat template?", "What if my base model has no chat template?"),
         ("Why deduplicate training data?", "What is near-duplicate removal?"),
         ("Why merge the adapter into the base model?", "How do I convert a merged model to GGUF?"),
         ("How do I upload my model to the Hub?", "Where do I put my Hugging Face token?"),
         ("What is Gradio?", "Why stream the answer?"), ("What is TRL?", "What is PEFT?"),
         ("What does the LoRA rank r control?", "What is lora_alpha?"),
         ("What temperature should the chatbot use?", "What is top_p?"),
         ("What is SmolLM2?", "Can I fine-tune without a GPU?"),
         ("What is FineTome?", "What is the score column in FineTome?"),
         ("Why is my loss NaN?", "What learning rate should I use for LoRA?"),
         ("What is the data report?", "How is the validation split made?"),
         ("What is a model card?", "How do I point the Space at my model?"),
         ("What is bitsandbytes?", "What is 8-bit Adam?"),
         ("What is gradient checkpointing?", "How much GPU memory does QLoRA need for 1B?"),
         ("What is the context window?", "Why does a bigger model answer slower on CPU?")]


def _lower_first(q: str) -> str:
    return q[0].lower() + q[1:] if not q[:2].isupper() and not q.startswith(("LoRA", "QLoRA", "GGUF", "NF4",
                                                                            "TRL", "PEFT", "FineTome", "I ")) else q


def build(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    index = {qs[0]: (qs, a) for qs, a in TOPICS}
    rows: list[dict] = []

    def chat(turns: list[tuple[str, str]], system: str | None) -> dict:
        msgs = [{"role": "system", "content": system}] if system else []
        for q, a in turns:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return {"messages": msgs}

    # Every wording of every topic once, a third of them with a system prompt.
    for questions, answer in TOPICS:
        for q in questions:
            rows.append(chat([(q, answer)], rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.33 else None))
    # Two-turn chats over related topics, each pair in two different wordings.
    for first, second in PAIRS:
        (q1s, a1), (q2s, a2) = index[first], index[second]
        for _ in range(2):
            q2 = rng.choice(q2s)
            follow = rng.choice(FOLLOW_UPS).format(q=_lower_first(q2), Q=q2)
            rows.append(chat([(rng.choice(q1s), a1), (follow, a2)],
                             rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.33 else None))
    # Deliberate duplicates: exact ones (only case / spacing differ, which dedup folds) and near ones (a word or
    # punctuation changed), so the dedup options have something to remove.
    for row in rng.sample(rows, 10):
        dup = json.loads(json.dumps(row))
        dup["messages"][-2]["content"] = "  " + dup["messages"][-2]["content"].lower() + " "
        rows.append(dup)
    for row in rng.sample(rows[: len(rows) - 10], 10):
        near = json.loads(json.dumps(row))
        q = near["messages"][-2]["content"].rstrip("?.")
        near["messages"][-2]["content"] = rng.choice([f"{q}??", f"Quick question: {q}?", f"{q}, please?"])
        rows.append(near)
    rng.shuffle(rows)
    return rows


def write_examples(out: Path) -> None:
    """One tiny file per other supported shape, for docs and quick tries (not used by the CPU recipe)."""
    out.mkdir(exist_ok=True)
    topic = {qs[0]: (qs, a) for qs, a in TOPICS}
    (qa1, a1), (qa2, a2), (qa3, a3) = topic["What is LoRA?"], topic["What is QLoRA?"], topic["What is GGUF?"]
    with (out / "sharegpt.jsonl").open("w", encoding="utf-8") as f:
        for (qs, a), score in (((qa1, a1), 4.8), ((qa2, a2), 4.1), ((qa3, a3), 3.2)):
            row = {"conversations": [{"from": "system", "value": SYSTEM_PROMPTS[0]},
                                     {"from": "human", "value": qs[0]}, {"from": "gpt", "value": a}],
                   "source": "sample", "score": score}
            f.write(json.dumps(row) + "\n")
    (out / "alpaca.json").write_text(json.dumps([
        {"instruction": "Explain this term in one sentence.", "input": "LoRA", "output": a1},
        {"instruction": qa2[0], "input": "", "output": a2},
    ], indent=1) + "\n", encoding="utf-8")
    with (out / "openorca.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, ["id", "system_prompt", "question", "response"])
        w.writeheader()
        w.writerow({"id": "o1", "system_prompt": SYSTEM_PROMPTS[1], "question": qa3[0], "response": a3})
        w.writerow({"id": "o2", "system_prompt": "", "question": qa1[1], "response": a1})
    with (out / "guanaco.jsonl").open("w", encoding="utf-8") as f:
        for qs, a in (topic["What is llama.cpp?"], topic["What is a Hugging Face Space?"]):
            f.write(json.dumps({"text": f"### Human: {qs[0]}### Assistant: {a}"}) + "\n")
    # ConvoKit-style utterances of a made-up two-scene script.
    script = [("c1", "Mia", "Did you see the loss curve this morning?"),
              ("c1", "Sam", "I did. It dropped fast and then went flat."),
              ("c1", "Mia", "Flat is fine if eval loss is flat too."),
              ("c1", "Leo", "Eval loss went up a little."),
              ("c1", "Sam", "Then we stop at the earlier checkpoint."),
              ("c2", "Leo", "The Space is slow today."),
              ("c2", "Mia", "Which quant did you upload?"),
              ("c2", "Leo", "Q8_0."),
              ("c2", "Sam", "Try Q4_K_M, it is half the size."),
              ("c2", "Mia", "And keep the context at 2048.")]
    with (out / "dialogue.jsonl").open("w", encoding="utf-8") as f:
        for i, (conv, speaker, text) in enumerate(script):
            f.write(json.dumps({"id": f"u{i}", "conversation_id": conv, "speaker": speaker, "text": text,
                                "timestamp": i, "reply_to": f"u{i - 1}" if i and script[i - 1][0] == conv
                                else None}) + "\n")


def main() -> None:
    rows = build()
    with (HERE / "sample.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_examples(HERE / "examples")
    print(f"wrote {len(rows)} conversations to {HERE / 'sample.jsonl'}")


if __name__ == "__main__":
    main()
