import sys
from pathlib import Path

# The API tests share api_helpers.py (pytest runs with --import-mode=importlib: no implicit sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
