"""Stage 2, training: how a run trains on this machine. The hardware plan (hardware), the base model with LoRA or
QLoRA (modeling), padding-free packing (packing), the DPO/KTO trainers (preference), resuming (resume), saving on a
signal (preemption), the forecast and progress line (progress), peak memory (peak_memory), and named model shapes
with random weights for tests and benchmarks (shapes)."""
