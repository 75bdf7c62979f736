"""Drop-in for the official ``runtime/python/fastapi/server.py``: same flags, same routes.

python3 runtime/python/fastapi/server.py --port 50000 --model_dir iic/CosyVoice-300M
"""

import sys
from pathlib import Path

try:
    from cosyserve.cli import main
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from cosyserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
