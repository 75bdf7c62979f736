"""The pronunciation lexicon: entries and their checks, pinyin / CMU as inline tokens, how a lexicon
applies to text (longest first, whole Latin words, inline tokens left alone), the text frontend keeping
inline tokens whole, the streamed-text hold-back, the SQLite store (restart, SIGKILL after a write, the
cap, the v1 -> v2 schema upgrade), and entries reaching the LLM input of the tiny v3 and v2 models."""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from functools import cache
from pathlib import Path

import pytest
from golden import REPO, golden_root
from resources import missing

from cosyserve.engine.request import SynthesisRequest
from cosyserve.engine.text_feed import FeedReader, TextFeed
from cosyserve.engine.voice_library.base import StoredPronunciation
from cosyserve.engine.voice_library.sqlite import DB_NAME, SQLiteVoiceLibrary
from cosyserve.errors import InvalidRequest, PronunciationLimitReached, SsmlError, UnknownPronunciation
from cosyserve.families import FAMILIES
from cosyserve.text.normalize import TextNormalizer
from cosyserve.text.pronunciation import (
    GLOBAL_SCOPE,
    MAX_REQUEST_ENTRIES,
    MAX_WORD_LENGTH,
    Lexicon,
    LexiconTarget,
    Pronunciation,
    cmu_tokens,
    parse_pronunciations,
    pinyin_tokens,
    voice_scope,
)
from cosyserve.text.tokenizers import COSYVOICE3_SPECIALS, QwenTokenizer

V3_TOKENS = frozenset(COSYVOICE3_SPECIALS)
INLINE = LexiconTarget("Fun-CosyVoice3 (cosyvoice3)", True, V3_TOKENS.__contains__)
PLAIN = LexiconTarget("CosyVoice2 (cosyvoice2)", False, lambda token: False)


def _model_dir(name: str) -> Path:
    path = golden_root() / "models" / name
    if not path.is_dir():
        missing(f"the golden tiny model {name}")
    return path


# -- entries and tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pinyin", "tokens"),
    [
        ("chong2 qing4", ["[ch]", "[óng]", "[q]", "[ìng]"]),
        ("chóng qìng", ["[ch]", "[óng]", "[q]", "[ìng]"]),  # tone marks taken as written
        ("Jiu3", ["[j]", "[iǔ]"]),  # iu: the mark on u
        ("hui4", ["[h]", "[uì]"]),  # ui: on i
        ("zhou1", ["[zh]", "[ōu]"]),  # ou: on o
        ("xue2", ["[x]", "[ué]"]),
        ("lve4 lüe4", ["[l]", "[vè]", "[l]", "[vè]"]),
        ("lv3 nü3", ["[l]", "[ǚ]", "[n]", "[ǚ]"]),
        ("er2", ["[ér]"]),
        ("de5 men", ["[d]", "[e]", "[m]", "[en]"]),  # 5 or none: toneless
        ("qiong2", ["[q]", "[ióng]"]),
    ],
)
def test_pinyin_becomes_the_v3_tokens(pinyin, tokens):
    assert pinyin_tokens(pinyin) == tokens
    assert set(tokens) <= V3_TOKENS


def test_cmu_becomes_phone_tokens():
    assert cmu_tokens("HH AH0 L ow1") == ["[HH]", "[AH0]", "[L]", "[OW1]"]
    assert set(cmu_tokens("HH AH0 L OW1")) <= V3_TOKENS


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"word": "x"}, "needs pinyin, cmu or respelling"),
        ({"word": "x", "pinyin": "ni3", "cmu": "N IY1"}, "both pinyin and cmu"),
        ({"word": "x", "pinyin": "ni9"}, "'ni9'"),
        ({"word": "x", "pinyin": "ng2"}, "no vowel"),
        ({"word": "x", "cmu": "HH AH7"}, "'AH7'"),
        ({"word": "", "respelling": "a"}, "must not be empty"),
        ({"word": "a" * (MAX_WORD_LENGTH + 1), "respelling": "a"}, f"at most {MAX_WORD_LENGTH}"),
        ({"word": "[a]", "respelling": "a"}, "brackets"),
        ({"word": "...", "respelling": "a"}, "no letter or digit"),
        ({"word": "x", "respelling": "<|endofprompt|>"}, "brackets"),
    ],
)
def test_bad_entries_are_refused_naming_the_problem(fields, words):
    with pytest.raises(InvalidRequest, match=words.replace("[", r"\[").replace("|", r"\|")):
        Pronunciation(**fields)


def test_request_form():
    entries = parse_pronunciations({"nginx": "engine x", "重庆": {"pinyin": "chong2 qing4"}})
    assert entries == (Pronunciation("nginx", respelling="engine x"), Pronunciation("重庆", pinyin="chong2 qing4"))
    assert parse_pronunciations([{"word": "hello", "cmu": "HH AH0 L OW1"}]) == (
        Pronunciation("hello", cmu="HH AH0 L OW1"),
    )
    too_many = {f"w{i}": "x" for i in range(MAX_REQUEST_ENTRIES + 1)}
    for bad, words in [
        (too_many, f"at most {MAX_REQUEST_ENTRIES}"),
        ({"a": 3}, "respelling string or an object"),
        ({"a": {"ipa": "x"}}, "unknown field"),
        ({"Word": "x", "WORD": "y"}, "same word"),
        ("word", "must be an object"),
    ]:
        with pytest.raises(InvalidRequest, match=words) as raised:
            parse_pronunciations(bad)
        assert raised.value.param == "pronunciations"
    with pytest.raises(InvalidRequest, match="at most"):
        SynthesisRequest("sft", "x", pronunciations=tuple(Pronunciation(f"w{i}", respelling="x") for i in range(101)))


def test_family_table_says_which_family_has_inline_tokens():
    assert {name for name, f in FAMILIES.items() if f.inline_pronunciation} == {"cosyvoice3"}


# -- applying -------------------------------------------------------------------------------------


def test_longest_match_first_and_whole_latin_words():
    lexicon = Lexicon(
        INLINE,
        stored=[
            Pronunciation("cat", respelling="kitty"),
            Pronunciation("cat food", respelling="kibble"),
            Pronunciation("重庆", pinyin="chong2 qing4"),
            Pronunciation("重", pinyin="zhong4"),
            Pronunciation("a", respelling="ay"),
        ],
    )
    assert lexicon.apply("Cat, cat food; concatenate cats CAT.") == "kitty, kibble; concatenate cats kitty."
    assert lexicon.apply("重庆很重") == "[ch][óng][q][ìng]很[zh][òng]"
    # Inline tokens and special tokens already in the text are never matched inside.
    assert lexicon.apply("[a] a <|endofprompt|> a[breath]") == "[a] ay <|endofprompt|> ay[breath]"


def test_request_entries_win_and_family_rules():
    stored = [Pronunciation("data", respelling="dah-tah"), Pronunciation("重庆", pinyin="chong2 qing4")]
    requested = [Pronunciation("DATA", respelling="day-tah")]
    assert Lexicon(INLINE, stored, requested).apply("data 重庆") == "day-tah [ch][óng][q][ìng]"
    # Without inline tokens: a stored pinyin-only entry is skipped, a requested one refused naming the family.
    assert Lexicon(PLAIN, stored, requested).apply("data 重庆") == "day-tah 重庆"
    with pytest.raises(InvalidRequest, match=r"CosyVoice2 \(cosyvoice2\) model has no inline pronunciation"):
        Lexicon(PLAIN, requested=[Pronunciation("重庆", pinyin="chong2 qing4")])
    # With a respelling too, each family takes what it can.
    both = [Pronunciation("重庆", pinyin="chong2 qing4", respelling="虫庆")]
    assert Lexicon(PLAIN, requested=both).apply("重庆") == "虫庆"
    assert Lexicon(INLINE, requested=both).apply("重庆") == "[ch][óng][q][ìng]"


def test_a_syllable_without_a_token_is_named():
    with pytest.raises(InvalidRequest, match=r"\[ǖ\]"):  # the v3 vocabulary has no first-tone ü
        Lexicon(INLINE, requested=[Pronunciation("绿", pinyin="lv1")])
    with pytest.raises(InvalidRequest, match=r"\[QX\]"):
        Lexicon(INLINE, requested=[Pronunciation("x", cmu="QX")])
    # Stored (through a model that could not check it): its respelling, or skipped; the request goes on.
    stored = [Pronunciation("绿", pinyin="lv1", respelling="率"), Pronunciation("x", cmu="QX")]
    assert Lexicon(INLINE, stored).apply("绿 x") == "率 x"


def test_streamed_text_waits_where_a_word_may_go_on():
    lexicon = Lexicon(
        INLINE, requested=[Pronunciation("cat", respelling="kitty"), Pronunciation("重庆", pinyin="chong2")]
    )
    feed, read = TextFeed(), []
    reader = FeedReader(feed, lambda text: read.append(lexicon.apply(text)) or [], hold=lexicon.held_back)
    for fragment in ["a ca", "t and ", "cat", "s 我去", "重", "庆", " bye"]:
        feed.append(fragment)
        reader.read()
    feed.close()
    reader.read()
    assert "".join(read).split() == ["a", "kitty", "and", "cats", "我去[ch][óng]", "bye"]


# -- the text frontend keeps inline tokens ----------------------------------------------------------


@cache
def _v3_tokenizer() -> QwenTokenizer:
    return QwenTokenizer(_model_dir("v3-tiny") / "CosyVoice-BlankEN", "cosyvoice3")


@pytest.mark.parametrize("backend", ["none", "wetext"])
def test_normalisation_leaves_inline_tokens_whole(backend):
    normalizer = TextNormalizer(_v3_tokenizer(), backend)
    said = normalizer.normalize("Say [HH][AH0][L][OW1] to 2 friends.", split=True)
    assert said == ["Say [HH][AH0][L][OW1] to two friends."]
    zh = normalizer.normalize("报道[j][ǐ]予好评，共3次。", split=True)
    assert len(zh) == 1 and "报道[j][ǐ]予好评" in zh[0]
    assert ("3" in zh[0]) == (backend == "none")  # wetext reads the number; the tokens stay as they are
    assert normalizer.normalize("He read [R][EH1][D] it.", split=False) == "He read [R][EH1][D] it."


# -- entries reach the LLM input --------------------------------------------------------------------


@cache
def _model(name: str, text_frontend: str = "none"):
    from cosyserve.engine.pipeline import load_model

    return load_model(_model_dir(name), text_frontend=text_frontend)


def _ids(name: str, text: str, text_frontend: str = "none", **fields) -> list[int]:
    model = _model(name) if text_frontend == "none" else _model(name, text_frontend)  # one model per cache key
    request = SynthesisRequest("sft", text, spk_id=model.voices.ids()[0], **fields)
    (segment,) = model.inputs.build(request)
    return segment.text.reshape(-1).tolist()


def _sub(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_v3_entries_reach_the_llm_as_pronunciation_tokens():
    tokenizer = _model("v3-tiny").frontend.tokenizer
    entries = (Pronunciation("重庆", pinyin="chong2 qing4"), Pronunciation("hello", cmu="HH AH0 L OW1"))
    ids = _ids("v3-tiny", "我去重庆。Say hello to them.", pronunciations=entries)
    chongqing = [tokenizer.special_tokens[t] for t in ("[ch]", "[óng]", "[q]", "[ìng]")]
    hello = [tokenizer.special_tokens[t] for t in ("[HH]", "[AH0]", "[L]", "[OW1]")]
    assert _sub(ids, chongqing) and _sub(ids, hello)
    assert not _sub(ids, tokenizer.encode("重庆")) and not _sub(ids, tokenizer.encode(" hello"))
    assert _ids("v3-tiny", "我去重庆。Say hello to them.") != ids  # without the entries: the plain text
    # Inline pinyin already in the text reaches it whole too.
    assert _sub(
        _ids("v3-tiny", "报道[j][ǐ]予好评。"), [tokenizer.special_tokens["[j]"], tokenizer.special_tokens["[ǐ]"]]
    )


@pytest.mark.parametrize("backend", ["none", "wetext"])
def test_v3_ssml_phoneme_reaches_the_llm_as_pronunciation_tokens(backend):
    tokenizer = _model("v3-tiny").frontend.tokenizer
    ssml = (
        '<speak>我去<phoneme alphabet="pinyin" ph="chong2 qing4">重庆</phoneme>。'
        'Say <phoneme alphabet="cmu" ph="HH AH0 L OW1">hello</phoneme> to [j][ǐ] them.</speak>'
    )
    ids = _ids("v3-tiny", ssml, backend)
    chongqing = [tokenizer.special_tokens[t] for t in ("[ch]", "[óng]", "[q]", "[ìng]")]
    hello = [tokenizer.special_tokens[t] for t in ("[HH]", "[AH0]", "[L]", "[OW1]")]
    pinyin = [tokenizer.special_tokens["[j]"], tokenizer.special_tokens["[ǐ]"]]
    assert _sub(ids, chongqing) and _sub(ids, hello) and _sub(ids, pinyin)
    assert not _sub(ids, tokenizer.encode("重庆"))
    # The same words with lexicon entries instead of <phoneme>: the same ids.
    entries = (Pronunciation("重庆", pinyin="chong2 qing4"), Pronunciation("hello", cmu="HH AH0 L OW1"))
    plain = "<speak>我去重庆。Say hello to [j][ǐ] them.</speak>"
    assert _ids("v3-tiny", plain, backend, pronunciations=entries) == ids
    # A request's own entry does not outrank the document's <phoneme> for the same word.
    assert _ids("v3-tiny", ssml, backend, pronunciations=(Pronunciation("重庆", respelling="崇庆"),)) == ids


def test_ssml_phoneme_is_refused_on_a_family_without_inline_tokens_and_checked_when_parsed():
    with pytest.raises(InvalidRequest, match=r"cosyvoice2"):
        _ids("v2-tiny", '<speak>我去<phoneme alphabet="pinyin" ph="chong2 qing4">重庆</phoneme>。</speak>')
    with pytest.raises(SsmlError, match=r"line 1, column 8: <phoneme>"):
        _ids("v3-tiny", '<speak><phoneme alphabet="cmu" ph="HH AH9">hi</phoneme></speak>')


@pytest.mark.parametrize("backend", ["none", "wetext"])
def test_v3_inline_tokens_in_the_text_pass_the_frontend_whole(backend):
    tokenizer = _model("v3-tiny").frontend.tokenizer
    phones = [tokenizer.special_tokens[t] for t in ("[HH]", "[AH0]", "[L]", "[OW1]")]
    ids = _ids("v3-tiny", "Say [HH][AH0][L][OW1] to 2 friends.", backend)
    assert _sub(ids, phones) and _sub(ids, tokenizer.encode(" two"))
    assert not _sub(ids, tokenizer.encode("zero")) and not _sub(ids, tokenizer.encode("one"))
    entries = (Pronunciation("hello", cmu="HH AH0 L OW1"),)
    assert _ids("v3-tiny", "Say hello to 2 friends.", backend, pronunciations=entries) == ids
    pinyin = [tokenizer.special_tokens["[j]"], tokenizer.special_tokens["[ǐ]"]]
    assert _sub(_ids("v3-tiny", "报道[j][ǐ]予好评，共3次。", backend), pinyin)


def test_v3_stored_entries_by_scope(tmp_path):
    model = _model("v3-tiny")
    store, speaker = model.pronunciations, model.voices.ids()[0]
    tokenizer = model.frontend.tokenizer
    store.put(Pronunciation("行", pinyin="hang2"), GLOBAL_SCOPE)
    store.put(Pronunciation("行", pinyin="xing2"), voice_scope(speaker))
    hang = [tokenizer.special_tokens["[h]"], tokenizer.special_tokens["[áng]"]]
    xing = [tokenizer.special_tokens["[x]"], tokenizer.special_tokens["[íng]"]]
    try:
        ids = _ids("v3-tiny", "银行。")  # the voice's entry wins over the global one
        assert _sub(ids, xing) and not _sub(ids, hang)
        store.remove(voice_scope(speaker), "行")
        assert _sub(_ids("v3-tiny", "银行。"), hang)
        requested = (Pronunciation("行", respelling="航"),)
        assert _ids("v3-tiny", "银行。", pronunciations=requested) == _ids("v3-tiny", "银航。")
    finally:
        store.remove(GLOBAL_SCOPE, "行")


def test_v2_speaks_the_respelling_and_refuses_pinyin_only():
    entries = (Pronunciation("nginx", respelling="engine x"),)
    assert _ids("v2-tiny", "I like nginx a lot.", pronunciations=entries) == _ids("v2-tiny", "I like engine x a lot.")
    with pytest.raises(InvalidRequest, match=r"cosyvoice2.*respelling"):
        _ids("v2-tiny", "我去重庆。", pronunciations=(Pronunciation("重庆", pinyin="chong2 qing4"),))
    model = _model("v2-tiny")
    model.pronunciations.put(Pronunciation("重庆", pinyin="chong2 qing4"), GLOBAL_SCOPE)
    try:  # stored without a respelling: skipped on this family, the request goes on
        assert _ids("v2-tiny", "我去重庆。") == model.frontend.tokenize("我去重庆。").reshape(-1).tolist()
    finally:
        model.pronunciations.remove(GLOBAL_SCOPE, "重庆")


def test_python_api_takes_pronunciations():
    model = _model("v2-tiny")
    speaker = model.voices.ids()[0]

    def audio(text: str, **options) -> list:
        return [c.tolist() for c in model.inference_sft(text, speaker, seed=3, **options)]

    respelled = audio("I like nginx.", pronunciations={"nginx": "engine x"})
    assert respelled == audio("I like engine x.") and respelled != audio("I like nginx.")


# -- the SQLite store ---------------------------------------------------------------------------


def _stored(word: str, scope: str = GLOBAL_SCOPE, **fields: str) -> StoredPronunciation:
    return StoredPronunciation(Pronunciation(word, **(fields or {"respelling": word + "!"})), scope, None, 1)


def test_sqlite_store_round_trip_replace_cap_and_reopen(tmp_path):
    library = SQLiteVoiceLibrary(tmp_path)
    assert library.put_pronunciation(_stored("Hello", cmu="HH AH0 L OW1")) is True
    assert library.put_pronunciation(_stored("HELLO", respelling="hullo")) is False  # replaced (any case)
    assert library.put_pronunciation(_stored("hello", voice_scope("Ann"))) is True  # another scope
    library.max_entries = 2
    library.put_pronunciation(_stored("two"))
    with pytest.raises(PronunciationLimitReached):
        library.put_pronunciation(_stored("three"))
    library.put_pronunciation(_stored("two", respelling="deux"))  # a replacement fits a full scope
    library.close()

    reopened = SQLiteVoiceLibrary(tmp_path)
    found = reopened.pronunciations([GLOBAL_SCOPE, voice_scope("ANN")])
    assert [(s.scope, s.entry.word, s.entry.respelling) for s in found] == [
        (GLOBAL_SCOPE, "HELLO", "hullo"),
        (GLOBAL_SCOPE, "two", "deux"),
        (voice_scope("ann"), "hello", "hello!"),
    ]
    assert [s.entry.word for s in reopened.voice_pronunciations()] == ["hello"]
    assert reopened.remove_pronunciation(GLOBAL_SCOPE, "Hello").entry.word == "HELLO"
    with pytest.raises(UnknownPronunciation):
        reopened.remove_pronunciation(GLOBAL_SCOPE, "hello")


def test_a_stores_lexicon_follows_writes_of_other_processes(tmp_path):
    from cosyserve.engine.pronunciations import PronunciationStore

    store = PronunciationStore(SQLiteVoiceLibrary(tmp_path), INLINE)
    other = SQLiteVoiceLibrary(tmp_path)  # another server on the same directory
    request = SynthesisRequest("sft", "x", spk_id="Ann")
    assert store.lexicon(request).apply("a cat") == "a cat"
    assert store.lexicon(request) is store.lexicon(request)  # kept while nothing is written
    before = other.pronunciation_revision()
    other.put_pronunciation(_stored("cat", voice_scope("ann"), respelling="kitty"))
    assert other.pronunciation_revision() == before + 1
    assert store.lexicon(request).apply("a cat") == "a kitty"
    other.remove_pronunciation(voice_scope("ann"), "CAT")
    assert store.lexicon(request).apply("a cat") == "a cat"
    own = SynthesisRequest("sft", "x", pronunciations=(Pronunciation("cat", respelling="moggy"),))
    assert store.lexicon(own).apply("a cat") == "a moggy"


def test_sqlite_v1_library_is_upgraded(tmp_path):
    SQLiteVoiceLibrary(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_NAME) as db:  # as schema 1 left it: no lexicon table
        db.execute("DROP TABLE pronunciations")
        db.execute("DROP TABLE pronunciation_revision")
        db.execute("DROP TABLE jobs")
        db.execute("DROP TABLE job_segments")
        db.execute("PRAGMA user_version = 1")
    library = SQLiteVoiceLibrary(tmp_path)
    assert library._db.execute("PRAGMA user_version").fetchone()[0] == 3  # and the jobs tables (v3)
    assert library.jobs() == []
    assert library.put_pronunciation(_stored("x")) and library.count() == 0


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cosyserve.engine.voice_library.base import StoredPronunciation
    from cosyserve.engine.voice_library.sqlite import SQLiteVoiceLibrary
    from cosyserve.text.pronunciation import GLOBAL_SCOPE, Pronunciation

    library = SQLiteVoiceLibrary(Path(sys.argv[1]))
    entry = Pronunciation("重庆", pinyin="chong2 qing4", respelling="虫庆")
    library.put_pronunciation(StoredPronunciation(entry, GLOBAL_SCOPE, None, 1))
    print("stored", flush=True)
    time.sleep(300)
    """
)


def test_sqlite_entry_survives_a_sigkill_after_its_write_returned(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "data")], stdout=subprocess.PIPE, text=True, env=env
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x.strip()) for x in proc.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=60) == "stored"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdout.close()
    (found,) = SQLiteVoiceLibrary(tmp_path / "data").pronunciations([GLOBAL_SCOPE])
    assert found.entry == Pronunciation("重庆", pinyin="chong2 qing4", respelling="虫庆")
