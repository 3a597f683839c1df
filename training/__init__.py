"""Training half: data, QLoRA fine-tuning, evaluation, merge, GGUF export and upload."""
