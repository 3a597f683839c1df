"""Stage 3, export: the adapter merged into full-precision weights (merge), GGUF files for llama.cpp (gguf), and
the model card, checkpoints and upload to the Hub (hub)."""
