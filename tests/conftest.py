import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from golden import REPO

_SHARED_ASSETS = REPO.parent / "shared" / "assets"
if _SHARED_ASSETS.is_dir() and "COSYSERVE_ASSETS_DIR" not in os.environ:
    # Tests read the tokenizer vocabularies from ../shared/assets instead of downloading them.
    os.environ["COSYSERVE_ASSETS_DIR"] = str(_SHARED_ASSETS)


if "COSYSERVE_DATA_DIR" not in os.environ:
    # Servers started by tests keep their voice library in a throwaway folder, never in ~/.local/share.
    os.environ["COSYSERVE_DATA_DIR"] = tempfile.mkdtemp(prefix="cosyserve-test-data-")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    # The tiny golden models run fastest single-threaded (and test processes may run side by side).
    torch.set_num_threads(1)
