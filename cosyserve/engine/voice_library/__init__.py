"""The voice library's storage: the embedded SQLite database (the default) or a shared PostgreSQL one.

:func:`open_voice_library` is the one place that picks the back-end, from one setting (``--voice_store``):
empty means SQLite under the data directory, a ``postgresql://`` URL means PostgreSQL. This module imports
neither back-end (nor torch) until it is called, so settings can validate the value cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import VoiceBackend

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def check_voice_store(voice_store: str) -> str:
    """``voice_store`` if it names a back-end (empty: SQLite; a PostgreSQL URL); else ValueError."""
    if voice_store and not voice_store.startswith(POSTGRES_SCHEMES):
        shown = voice_store.split("://", 1)[0] + "://..." if "://" in voice_store else "a plain string"
        raise ValueError(  # the value may hold a password: only its scheme is shown
            f"the voice store must be a postgresql:// URL, not {shown} (leave it empty for the SQLite library "
            "under the data directory)"
        )
    return voice_store


def open_voice_library(voice_store: str, data_dir: Path | None, max_voices: int) -> VoiceBackend:
    """The voice library ``voice_store`` names: PostgreSQL for a ``postgresql://`` URL, else SQLite under
    ``data_dir`` (None: in memory). Raises ModelLoadError when it cannot be opened."""
    if check_voice_store(voice_store):
        from .postgres import PostgresVoiceLibrary

        return PostgresVoiceLibrary(voice_store, max_voices)
    from .sqlite import SQLiteVoiceLibrary

    return SQLiteVoiceLibrary(data_dir, max_voices)
