"""The SSML parser (cosyserve.text.ssml): every tag, the malformed cases with their line and column, and
hostile documents (external entity, entity bomb) refused fast, small and without reading a file."""

from __future__ import annotations

import dataclasses
import pickle
import sys
import time
import tracemalloc
from typing import ClassVar

import pytest

from cosyserve.engine.request import SynthesisRequest
from cosyserve.errors import InvalidRequest, SsmlError
from cosyserve.text.pronunciation import Pronunciation
from cosyserve.text.ssml import (
    BREAK_STRENGTHS,
    MAX_BREAK_S,
    RATES,
    Pause,
    Span,
    is_ssml,
    parse_ssml,
    say_as,
)


def spans(text: str) -> list[Span]:
    return [p for p in parse_ssml(text).parts if isinstance(p, Span)]


def spoken(text: str) -> str:
    return parse_ssml(text).text


def test_ssml_is_detected_by_its_speak_prefix_only():
    assert is_ssml("<speak>hi</speak>") and is_ssml("  \n<speak version='1.0'>hi</speak>")
    assert is_ssml('<?xml version="1.0"?><speak>hi</speak>') and is_ssml("<!DOCTYPE speak><speak/>")
    assert not is_ssml("hello <speak>") and not is_ssml("<speaker>x</speaker>") and not is_ssml(None)
    assert not is_ssml("<b>bold</b>")


def test_plain_text_and_white_space():
    doc = parse_ssml("<speak>\n  Hello,\n   world.  </speak>")
    assert doc.parts == (Span(" Hello, world. "),) and doc.ignored == () and doc.phonemes == ()


@pytest.mark.parametrize(
    ("tag", "seconds"),
    [('<break time="500ms"/>', 0.5), ('<break time="1.5s"/>', 1.5), ("<break/>", BREAK_STRENGTHS["medium"])]
    + [(f'<break strength="{s}"/>', v) for s, v in BREAK_STRENGTHS.items() if v]
    + [('<break time="250ms" strength="x-strong"/>', 0.25)],
)
def test_break_is_a_pause(tag, seconds):
    doc = parse_ssml(f"<speak>One.{tag}Two.</speak>")
    assert doc.parts == (Span("One."), Pause(seconds), Span("Two."))


def test_breaks_in_a_row_add_up_and_a_none_break_is_no_pause():
    doc = parse_ssml('<speak>a<break time="200ms"/> <break time="300ms"/>b<break strength="none"/>c</speak>')
    assert doc.parts == (Span("a"), Pause(0.5), Span("bc"))


@pytest.mark.parametrize("value", ["fast", "-1s", "500", "1e3ms"])
def test_a_bad_break_time_names_its_place(value):
    with pytest.raises(SsmlError, match=r"line 2, column 3: <break time=") as caught:
        parse_ssml(f"<speak>x\n  <break time='{value}'/></speak>")
    assert (caught.value.line, caught.value.column) == (2, 3)


def test_breaks_are_bounded():
    with pytest.raises(SsmlError, match="at most"):
        parse_ssml(f'<speak>x<break time="{MAX_BREAK_S + 1:g}s"/></speak>')
    many = '<break time="10s"/>' * 7
    with pytest.raises(SsmlError, match="add up"):
        parse_ssml(f"<speak>x{many}</speak>")
    with pytest.raises(SsmlError, match="strength"):
        parse_ssml('<speak>x<break strength="loud"/></speak>')


@pytest.mark.parametrize(
    ("rate", "want"),
    [(k, v) for k, v in RATES.items()] + [("80%", 0.8), ("150%", 1.5), ("1.2", 1.2), ("+10%", 1.1), ("-20%", 0.8)],
)
def test_prosody_rate(rate, want):
    parts = spans(f'<speak>a <prosody rate="{rate}">b</prosody> c</speak>')
    if want == 1.0:  # the normal rate: one span
        assert parts == [Span("a b c")]
        return
    (before, inside, after) = parts
    assert (before.rate, after.rate) == (1.0, 1.0) and inside.text == "b"
    assert inside.rate == pytest.approx(want)


def test_relative_rates_follow_the_enclosing_one():
    parts = spans('<speak><prosody rate="slow">a<prosody rate="+100%">b</prosody>c</prosody></speak>')
    assert [(s.text, s.rate) for s in parts] == [("a", 0.75), ("b", 1.5), ("c", 0.75)]


@pytest.mark.parametrize("rate", ["0%", "-100%", "quick", "-1", "1e9"])
def test_a_bad_rate_is_refused(rate):
    with pytest.raises(SsmlError, match=r"line 1, column 11: <prosody rate="):
        parse_ssml(f'<speak>ab <prosody rate="{rate}">x</prosody></speak>')


def test_other_prosody_attributes_are_reported_ignored():
    doc = parse_ssml('<speak><prosody pitch="high" volume="loud" rate="fast">x</prosody></speak>')
    assert doc.ignored == ("prosody@pitch", "prosody@volume") and doc.parts == (Span("x", rate=1.25),)


@pytest.mark.parametrize(
    ("kind", "text", "english", "chinese"),
    [
        ("characters", "ab1", "A B one", "A B 一"),
        ("spell-out", "NASA", "N A S A", "N A S A"),
        ("digits", "2048", "two zero four eight", "二零四八"),
        ("cardinal", "1,234", "one thousand two hundred and thirty four", "一千二百三十四"),
        ("cardinal", "-3.25", "minus three point two five", "负三点二五"),
        ("number", "15", "fifteen", "十五"),
        ("ordinal", "21st", "twenty first", "第二十一"),
        ("ordinal", "3", "third", "第三"),
        ("date", "2024-03-05", "March fifth, twenty twenty four", "二零二四年三月五日"),
        ("date", "2005/12/31", "December thirty first, two thousand and five", "二零零五年十二月三十一日"),
        ("time", "14:30", "fourteen thirty", "十四点三十分"),
        ("time", "9:05 pm", "nine oh five p m", "下午九点五分"),
        ("time", "7:00", "seven o'clock", "七点整"),
        ("telephone", "+1 555 0100", "plus one, five five five, zero one zero zero", "加幺五五五零幺零零"),
    ],
)
def test_say_as_reads_in_the_span_language(kind, text, english, chinese):
    assert say_as(kind, text, chinese=False).strip() == english
    assert say_as(kind, text, chinese=True).strip() == chinese
    element = f'<say-as interpret-as="{kind}">{text}</say-as>'
    assert spoken(f'<speak xml:lang="en-US">Say {element}.</speak>') == f"Say {english}."
    assert spoken(f'<speak xml:lang="zh-CN">说{element}。</speak>') == f"说{chinese}。"


def test_say_as_language_comes_from_lang_or_the_document():
    digits = '<say-as interpret-as="digits">12</say-as>'
    assert spoken(f"<speak>号码{digits}</speak>") == "号码一二"  # Chinese text: Chinese readings
    assert spoken(f"<speak>Number {digits}</speak>") == "Number one two "
    assert spoken(f'<speak>号码<lang xml:lang="en">{digits}</lang></speak>') == "号码 one two "
    doc = parse_ssml(f'<speak>Number <lang xml:lang="zh-CN">{digits}</lang></speak>')
    assert doc.parts == (Span("Number "), Span("一二", language="zh-CN"))


def test_date_format_attribute():
    assert spoken('<speak><say-as interpret-as="date" format="dmy">05/03/2024</say-as></speak>').strip() == (
        "March fifth, twenty twenty four"
    )
    assert spoken('<speak><say-as interpret-as="date" format="md">12-25</say-as></speak>').strip() == (
        "December twenty fifth"
    )


def test_unknown_say_as_is_spoken_as_written_and_reported():
    doc = parse_ssml('<speak><say-as interpret-as="unit">5kg</say-as></speak>')
    assert doc.text == "5kg" and doc.ignored == ("say-as@interpret-as=unit",)


def test_sub_speaks_its_alias():
    assert spoken('<speak>The <sub alias="World Wide Web">WWW</sub> is big.</speak>') == "The World Wide Web is big."
    with pytest.raises(SsmlError, match="line 1, column 8: <sub> needs"):
        parse_ssml("<speak><sub>WWW</sub></speak>")


def test_phoneme_keeps_its_text_and_records_an_entry():
    doc = parse_ssml(
        '<speak>A <phoneme alphabet="cmu" ph="T AH0 M EY1 T OW2">tomato</phoneme> and '
        '<phoneme alphabet="pinyin" ph="zhong4">重</phoneme> and <phoneme alphabet="ipa" ph="x">y</phoneme></speak>'
    )
    assert doc.text == "A tomato and 重 and y"
    assert doc.phonemes == (Pronunciation("tomato", cmu="T AH0 M EY1 T OW2"), Pronunciation("重", pinyin="zhong4"))
    assert doc.ignored == ("phoneme@alphabet=ipa",)
    with pytest.raises(SsmlError, match="ph"):
        parse_ssml('<speak><phoneme alphabet="cmu">x</phoneme></speak>')


def test_paragraphs_and_sentences_start_segments():
    doc = parse_ssml("<speak>Intro <p><s>One.</s><s>Two.</s></p> tail <paragraph>Three</paragraph></speak>")
    assert [(s.text, s.segment_start) for s in spans_of(doc)] == [
        ("Intro ", False),
        ("One.", True),
        ("Two.", True),
        (" tail ", True),
        ("Three", True),
    ]


def spans_of(doc):
    return [p for p in doc.parts if isinstance(p, Span)]


def test_emphasis_marks_its_span():
    parts = spans('<speak>I <emphasis>really</emphasis> do <emphasis level="none">not</emphasis></speak>')
    assert [(s.text, s.emphasis) for s in parts] == [("I ", False), ("really", True), (" do not", False)]


def test_unknown_tags_are_spoken_and_named_once():
    doc = parse_ssml(
        '<speak><voice name="x">Hi</voice> <audio src="a.wav">beep</audio> <voice>yo</voice><mark/></speak>'
    )
    assert doc.text == "Hi beep yo" and doc.ignored == ("voice", "audio", "mark")


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        ("<speak>Hello", 1, 13, "no element found"),
        ("<speak>\n<p>Hello</s></speak>", 2, 11, "mismatched tag"),
        ("<speak>\n  a & b</speak>", 2, 6, "not well-formed"),
        ("<speak>fish &chips;</speak>", 1, 13, "undefined entity"),
        ("<voice>hi</voice>", 1, 1, "root element must be <speak>"),
        ("<speak>a</speak><speak>b</speak>", 1, 17, "junk after document element"),
        ('<speak a="1" a="2">x</speak>', 1, 14, "duplicate attribute"),
    ],
)
def test_malformed_documents_name_line_and_column(text, line, column, words):
    with pytest.raises(SsmlError) as caught:
        parse_ssml(text)
    error = caught.value
    assert (error.line, error.column) == (line, column), error.message
    assert f"line {line}, column {column}" in error.message and words in error.message
    assert isinstance(error, InvalidRequest) and 400 <= error.status < 500


class FileReads:
    """Records every file a piece of code opens (an audit hook; hooks cannot be removed, so it is gated)."""

    installed = False
    active = False
    paths: ClassVar[list[str]] = []

    def __enter__(self) -> FileReads:
        if not FileReads.installed:
            sys.addaudithook(FileReads.hook)
            FileReads.installed = True
        FileReads.paths = []
        FileReads.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        FileReads.active = False

    @staticmethod
    def hook(event: str, args: tuple) -> None:
        if FileReads.active and event == "open":
            FileReads.paths.append(str(args[0]))


def refused_cheaply(text: str) -> SsmlError:
    """Parse ``text`` expecting a refusal; within 100 ms, < 10 MB of memory, no file opened."""
    tracemalloc.start()
    try:
        with FileReads() as reads:
            started = time.perf_counter()
            with pytest.raises(SsmlError) as caught:
                parse_ssml(text)
            elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.1, elapsed
    assert peak < 10 * 2**20, peak
    assert reads.paths == [], reads.paths
    return caught.value


def test_an_external_entity_is_refused_without_reading_the_file(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    for target in (secret.as_uri(), "file:///etc/passwd"):
        error = refused_cheaply(
            f'<?xml version="1.0"?>\n<!DOCTYPE speak [<!ENTITY x SYSTEM "{target}">]>\n<speak>&x;</speak>'
        )
        assert "DOCTYPE" in error.message and error.line == 2 and "TOP-SECRET" not in error.message
    # Without a DOCTYPE no entity can be declared: a reference to one is an undefined entity.
    assert "undefined entity" in refused_cheaply("<speak>&x;</speak>").message


def test_an_entity_bomb_is_refused_fast_and_small():
    entities = '<!ENTITY lol "lol">' + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
    )
    error = refused_cheaply(f'<?xml version="1.0"?>\n<!DOCTYPE lolz [{entities}]>\n<speak>&lol9;</speak>')
    assert "DOCTYPE" in error.message
    # A parameter entity (external DTD subset) is refused the same way.
    refused_cheaply('<!DOCTYPE speak SYSTEM "http://example.com/x.dtd"><speak>x</speak>')


def test_the_document_travels_with_its_request():
    request = SynthesisRequest("sft", '<speak>Hi <break time="1s"/> there</speak>', spk_id="a")
    assert request.ssml is not None and request.ssml.parts[1] == Pause(1.0)
    copy = pickle.loads(pickle.dumps(request))
    assert copy == request and copy.ssml == request.ssml
    assert SynthesisRequest("sft", "plain <b>text</b>", spk_id="a").ssml is None
    assert dataclasses.replace(request, text="<speak>Other</speak>").ssml == parse_ssml("<speak>Other</speak>")
    with pytest.raises(SsmlError):
        SynthesisRequest("sft", "<speak>oops", spk_id="a")
    error = pickle.loads(pickle.dumps(SsmlError("bad", 3, 4)))
    assert (error.line, error.column, error.message) == (3, 4, "invalid SSML at line 3, column 4: bad")


FUZZ_SEED_DOCUMENT = (
    '<speak xml:lang="en">A <break time="300ms"/><prosody rate="+10%">b <emphasis>c</emphasis></prosody>'
    '<say-as interpret-as="cardinal">1,234.5</say-as><say-as interpret-as="date" format="dmy">05/03/2024</say-as>'
    '<say-as interpret-as="time">9:30 pm</say-as><say-as interpret-as="telephone">+86 138</say-as>'
    '<sub alias="x">y</sub><phoneme alphabet="cmu" ph="AH0">a</phoneme><p><s>z</s></p><lang xml:lang="zh">一</lang>'
    "</speak>"
)


def test_any_mangled_document_parses_or_is_an_ssml_error():
    """Truncations and character swaps of a document using every tag: a document or an SsmlError, nothing else."""
    import random

    rng = random.Random(1234)
    alphabet = "<>/=\"'&;:%+-.,0123456789 \nabcdefghijklmnopqrstuvwxyz一"
    variants = [FUZZ_SEED_DOCUMENT[:n] for n in range(len(FUZZ_SEED_DOCUMENT))]
    for _ in range(3000):
        chars = list(FUZZ_SEED_DOCUMENT)
        for _ in range(rng.randint(1, 4)):
            chars[rng.randrange(len(chars))] = rng.choice(alphabet)
        variants.append("".join(chars))
    for kind in ("cardinal", "ordinal", "digits", "date", "time", "telephone", "characters"):
        variants.append(f'<speak><say-as interpret-as="{kind}" format="zz">{"9" * 5000},{"1" * 3}</say-as></speak>')
    variants.append(f'<speak><prosody rate="{"9" * 400}">x</prosody><break time="{"9" * 400}ms"/></speak>')
    for text in variants:
        try:
            doc = parse_ssml(text)
        except SsmlError as exc:
            assert exc.line >= 1 and exc.column >= 1
        else:
            assert isinstance(doc.text, str)
