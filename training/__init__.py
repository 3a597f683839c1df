"""Training half, by stage: data/ (read, clean, split) -> trainer/ (plan, model, LoRA/QLoRA, resume) -> export/
(merge, GGUF, Hub) -> evaluation/ (held-out loss, preference rate, serving cost). Entry points: finetune.py,
evaluate.py, sweep.py, export_gguf.py, and `python -m training.data`; config.py is the recipe and chat_format.py the
one place that templates and masks."""
