"""python -m training.data FILE_OR_ID... (also `python training/data FILE_OR_ID...`)."""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from training.data.cli import main

main()
