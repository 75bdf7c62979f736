"""The pronunciation lexicon of one loaded model: the stored entries (in the voice library's database, see
:mod:`cosyserve.engine.voice_library.base`) and what the model makes of an entry.

A request reaches the stored entries of the global scope, of its voice (``spk_id``) and of its API key
(``SynthesisRequest.lexicon_owner``), the more specific winning for the same word, and its own entries win
over all (:meth:`PronunciationStore.lexicon`). How entries apply to the text: :mod:`cosyserve.text.pronunciation`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from cosyserve.families import Family
from cosyserve.text.pronunciation import (
    GLOBAL_SCOPE,
    Lexicon,
    LexiconTarget,
    Pronunciation,
    key_scope,
    voice_scope,
)
from cosyserve.text.tokenizers import TextTokenizer, has_token

from .request import SynthesisRequest
from .voice_library.base import StoredPronunciation, VoiceBackend


def lexicon_target(family: Family, tokenizer: TextTokenizer) -> LexiconTarget:
    """What a model of ``family`` with ``tokenizer`` makes of lexicon entries."""
    return LexiconTarget(
        f"{family.display} ({family.name})", family.inline_pronunciation, lambda token: has_token(tokenizer, token)
    )


class PronunciationStore:
    """The stored lexicon as one model sees it (every model of a server shares the library)."""

    # Lexicons of stored entries kept, by (revision, scopes): a request reads the revision only.
    CACHED = 16

    def __init__(self, library: VoiceBackend, target: LexiconTarget) -> None:
        self.library = library
        self.target = target
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, tuple[str, ...]], Lexicon] = OrderedDict()

    def usable(self, entry: Pronunciation) -> bool:
        """Whether this model speaks ``entry`` (else it skips it: pinyin / CMU only, and no inline tokens or
        not every one its tokenizer has)."""
        tokens = entry.tokens if self.target.inline_tokens else None
        return entry.respelling is not None or (tokens is not None and all(map(self.target.is_token, tokens)))

    def check(self, entry: Pronunciation) -> None:
        """Raise the 4xx this model would for ``entry`` sent with a request (a syllable / phone its tokenizer
        has no token for); an entry it cannot use at all is fine to store (for other models)."""
        if self.target.inline_tokens and entry.tokens is not None:
            Lexicon(self.target, requested=[entry])

    def put(self, entry: Pronunciation, scope: str, voice: str | None = None) -> tuple[StoredPronunciation, bool]:
        """Store (or replace) ``entry`` in ``scope``; (what was stored, whether it is new)."""
        stored = StoredPronunciation(entry, scope, voice, int(time.time()))
        return stored, self.library.put_pronunciation(stored)

    def entries(self, scopes: list[str]) -> list[StoredPronunciation]:
        return self.library.pronunciations(scopes)

    def voice_entries(self) -> list[StoredPronunciation]:
        return self.library.voice_pronunciations()

    def remove(self, scope: str, word: str) -> StoredPronunciation:
        return self.library.remove_pronunciation(scope, word)

    @staticmethod
    def scopes(request: SynthesisRequest) -> list[str]:
        """The scopes whose entries ``request`` reaches, most general first."""
        scopes = [GLOBAL_SCOPE]
        if request.spk_id:
            scopes.append(voice_scope(request.spk_id))
        if request.lexicon_owner:
            scopes.append(key_scope(request.lexicon_owner))
        return scopes

    def stored_lexicon(self, scopes: list[str]) -> Lexicon:
        """The stored entries of ``scopes`` ready to apply (built once per lexicon revision)."""
        key = (self.library.pronunciation_revision(), tuple(scopes))
        with self._lock:
            lexicon = self._cache.get(key)
            if lexicon is not None:
                self._cache.move_to_end(key)
                return lexicon
        # Read after the revision: a write in between makes the entries newer than the key, never older.
        lexicon = Lexicon(self.target, [s.entry for s in self.entries(scopes)])
        with self._lock:
            self._cache[key] = lexicon
            while len(self._cache) > self.CACHED:
                self._cache.popitem(last=False)
        return lexicon

    def lexicon(self, request: SynthesisRequest) -> Lexicon:
        """The entries that apply to ``request``'s text on this model (raises its 4xx: see :class:`Lexicon`)."""
        return self.stored_lexicon(self.scopes(request)).with_requested(request.requested_pronunciations)
