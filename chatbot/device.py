"""Where the transformers backend runs and in which precision: one pure decision, and the probe that feeds it.

    CHATBOT_DEVICE=auto   CUDA when torch sees a GPU (on ZeroGPU it sees the emulated one at start-up), else CPU
    CHATBOT_DEVICE=cpu    CPU, fp32
    CHATBOT_DEVICE=cuda   the GPU, or one line and exit 2 where torch sees none

On a GPU the weights are bf16 from compute capability 8.0 up (A100, L4, H100, H200, Blackwell): the precision
the models are trained in, with fp32's range. Below (T4 sm75, V100 sm70) bf16 has no tensor-core path, so fp16.
On a CPU fp32: bf16 matmuls are slow on most CPUs and the models served here are small.
"""
from __future__ import annotations

from dataclasses import dataclass

from chatbot.settings import DEVICE_NAMES, ConfigError

BF16_FROM = (8, 0)  # compute capability from which bf16 runs on tensor cores


@dataclass(frozen=True)
class Placement:
    device: str   # "cpu" | "cuda"
    dtype: str    # a torch dtype name: "float32" | "bfloat16" | "float16"
    reason: str   # one short phrase for the start-up line

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def choose_device(requested: str, capability: tuple[int, int] | None) -> Placement:
    """The placement for CHATBOT_DEVICE=`requested` where the GPU torch sees has `capability` (None: no GPU)."""
    if requested not in DEVICE_NAMES:
        raise ConfigError(f"CHATBOT_DEVICE={requested!r} is not valid; accepted: {', '.join(DEVICE_NAMES)}")
    if requested == "cpu" or (requested == "auto" and capability is None):
        return Placement("cpu", "float32", "CPU" + (" (no CUDA device)" if requested == "auto" else ""))
    if capability is None:
        raise ConfigError(f"CHATBOT_DEVICE={requested!r} is not valid; accepted: auto or cpu here (torch sees no "
                          "CUDA device: a GPU machine with a CUDA build of torch, or a ZeroGPU Space, runs cuda)")
    sm = f"sm{capability[0]}{capability[1]}"
    if tuple(capability) >= BF16_FROM:
        return Placement("cuda", "bfloat16", f"CUDA {sm}, bf16")
    return Placement("cuda", "float16", f"CUDA {sm}, fp16 (no bf16 tensor cores below sm80)")


def cuda_capability() -> tuple[int, int] | None:
    """The compute capability of the GPU torch sees, or None. On ZeroGPU this is the emulated device `spaces`
    reports before any GPU is attached, so `spaces` must be imported first (chatbot.zerogpu.activate does)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def detect(requested: str) -> Placement:
    return choose_device(requested, cuda_capability())
