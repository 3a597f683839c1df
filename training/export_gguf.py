"""Export a merged Hugging Face checkpoint to GGUF, offline (the code is training/export/gguf.py).

    python training/export_gguf.py --model RUN_DIR/merged --out DIR --quant q4_k_m q8_0 f16
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.export.gguf import main

if __name__ == "__main__":
    sys.exit(main())
