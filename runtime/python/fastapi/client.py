"""Drop-in for the official ``runtime/python/fastapi/client.py``: same flags, writes a correct WAV.

python3 runtime/python/fastapi/client.py --port 50000 --mode sft --tts_text "..." --spk_id 中文女
"""

import sys
from pathlib import Path

try:
    from cosyserve.cli import main
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from cosyserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["client", *sys.argv[1:]]))
