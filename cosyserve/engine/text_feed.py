"""Text that arrives over time (bi-streaming input): the caller appends fragments and closes the feed;
the engine's thread takes them as they come.

:class:`TextFeed` is the caller's side: thread-safe, appending never waits for the engine.
:class:`FeedReader` is the engine's side: it turns each fragment into text ids on its own (the
reference tokenises each string its text generator yields; there is no sentence splitting across
the stream).

Text normalisation does not run on streamed text (the reference does not normalise a text generator
either): wetext and the number spelling read whole sentences, and a fragment boundary can fall inside
a number ("20" + "24") or an abbreviation, where normalising each piece would say something else.
One thing is adjusted: whitespace at the end of a fragment moves to the start of the next one, so text
streamed word by word ("Hello ", "there ") tokenises into the BPE pieces the whole text would give
(" there" is one piece; "there" + " " are two the model rarely saw). The first fragment's leading
whitespace and the last one's trailing whitespace are dropped, as the text frontend strips a text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from cosyserve.errors import TextError


class TextFeed:
    """One request's text, fragment by fragment (see the module doc)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fragments: list[str] = []
        self._closed = False
        self._close_taken = False
        self._listener: Callable[[], None] | None = None

    def append(self, text: str) -> None:
        """Add a fragment (an empty one is ignored); a TextError once the feed is closed."""
        if not isinstance(text, str):
            raise TextError("a text fragment must be a string", param="text")
        with self._cond:
            if self._closed:
                raise TextError("the text has ended (the feed is closed)", param="text")
            if not text:
                return
            self._fragments.append(text)
            self._cond.notify_all()
        self._notify()

    def close(self) -> None:
        """The text is complete: what is left is spoken and the request ends. Closing twice is fine."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._notify()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    @property
    def has_news(self) -> bool:
        """Fragments or the close are waiting to be taken."""
        with self._cond:
            return self._news()

    def _news(self) -> bool:
        return bool(self._fragments) or (self._closed and not self._close_taken)

    def take(self) -> tuple[list[str], bool]:
        """(the fragments appended since the last take, whether the feed is closed)."""
        with self._cond:
            fragments, self._fragments = self._fragments, []
            if self._closed:
                self._close_taken = True
            return fragments, self._closed

    def wait(self, timeout: float) -> bool:
        """Block until something can be taken (or ``timeout`` seconds); whether it can."""
        with self._cond:
            return self._cond.wait_for(self._news, timeout)

    def listen(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (from the appending thread, no lock held) after each append and the close."""
        with self._cond:
            self._listener = callback

    def _notify(self) -> None:
        with self._cond:
            listener = self._listener
        if listener is not None:
            listener()


class FeedReader:
    """The engine's side of a :class:`TextFeed`: each fragment as text ids, whitespace moved forward."""

    def __init__(
        self,
        feed: TextFeed,
        tokenize: Callable[[str], list[int]],
        first: str | None = None,
        hold: Callable[[str], int] | None = None,
    ) -> None:
        """``hold(text)``: how many characters at the end of ``text`` may be the start of a longer unit (a
        lexicon word the next fragment completes); they wait for it (or for the end of the text)."""
        self.feed = feed
        self.tokenize = tokenize
        self.hold = hold
        self._first = [first] if first else []
        self._carry = ""
        self._started = False

    @property
    def has_news(self) -> bool:
        return bool(self._first) or self.feed.has_news

    def read(self) -> tuple[list[int], bool]:
        """(the text ids of the fragments that came since the last read, whether the text has ended)."""
        fragments, closed = self.feed.take()
        fragments, self._first = self._first + fragments, []
        ids: list[int] = []
        for fragment in fragments:
            text = self._carry + fragment
            if not self._started:
                text = text.lstrip()
            body = text.rstrip()
            self._carry = text[len(body) :]
            if body and not self._carry and self.hold is not None:
                held = self.hold(body)
                body, self._carry = body[: len(body) - held], body[len(body) - held :]
            if body:
                self._started = True
                ids += self.tokenize(body)
        if closed and self._carry.strip():
            rest, self._carry = self._carry.strip(), ""
            self._started = True
            ids += self.tokenize(rest)
        return ids, closed
