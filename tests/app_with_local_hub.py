"""`python tests/app_with_local_hub.py REMOTE_DIR`: app.py itself, its feedback dataset pushed by the real
CommitScheduler to a LocalHub that commits into REMOTE_DIR (no network, no token). For tests that stop the app."""
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatbot import feedback  # noqa: E402
from tests.local_hub import LocalHub  # noqa: E402

remote = Path(sys.argv[1])
open_log = feedback.open_log
feedback.open_log = lambda settings, hf_api=None: open_log(settings, hf_api=LocalHub(remote))
sys.argv = [str(ROOT / "app.py")]
runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
