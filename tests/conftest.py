import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "deploy" / "data" / "gsm8k" / "train.jsonl"  # in the repository (MIT, see its README)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(ROOT))
