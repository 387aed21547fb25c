import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The datasets live beside the checkout (../shared/datasets) unless told otherwise.
os.environ.setdefault("TANDEM_DATA_DIR", str(ROOT.parent / "shared" / "datasets"))
