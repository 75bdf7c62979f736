"""Text tokenizers of the CosyVoice families (spec §6).

Every tokenizer is used through ``encode(text) -> list[int]`` only, with special tokens recognised
anywhere in the text (the reference always passes ``allowed_special='all'``). No BOS/EOS is added.

- v1 (300M / SFT / Instruct): openai-whisper's multilingual tiktoken BPE + Whisper specials.
- v1-25Hz: CosyVoice's ``multilingual_zh_ja_yue_char_del.tiktoken`` + its larger special list.
- v2 / v3: Qwen2 byte-level BPE from ``<model_dir>/CosyVoice-BlankEN`` + the CosyVoice specials.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Protocol

import tiktoken
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

from cosyserve.config import ConfigError, Node
from cosyserve.errors import ModelLoadError
from cosyserve.hub import asset_path


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


WHISPER_TARGET = "whisper.tokenizer.get_tokenizer"
COSYVOICE_TARGET = "cosyvoice.tokenizer.tokenizer.get_tokenizer"
QWEN_TARGET = "cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer"
# The BPE ranks of the tiktoken tokenizers are not in the model directories (hub assets).
TIKTOKEN_ASSETS = {
    WHISPER_TARGET: "multilingual.tiktoken",
    COSYVOICE_TARGET: "multilingual_zh_ja_yue_char_del.tiktoken",
}


def _words(text: str) -> list[str]:
    return text.split()


# Whisper's language codes in its table order (the id of a language tag is its index + 2 after
# <|endoftext|>); the first 100 are the ones the CosyVoice tokenizers register.
LANGUAGES = _words(
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no "
    "th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw "
    "gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl "
    "mg as tt haw ln ha ba jw su yue"
)

# GPT-2 style pre-tokenisation used by both tiktoken vocabularies.
_TIKTOKEN_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_COSYVOICE_EVENT_TAGS = _words("ASR AED SER Speech /Speech BGM /BGM Laughter /Laughter Applause /Applause")
_COSYVOICE_EMOTION_TAGS = _words("HAPPY SAD ANGRY NEUTRAL")
_COSYVOICE_TTS_TAGS = ["TTS/B", "TTS/O", "TTS/Q", "TTS/A", "TTS/CO", "TTS/CL", "TTS/H"] + [
    f"TTS/SP{i:02d}" for i in range(1, 14)
]

# Qwen2 pre-tokeniser (digits are isolated one by one, letters keep one leading non-letter).
_QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ``additional_special_tokens`` of the CosyVoice2 tokenizer, in order (new ones get consecutive ids).
COSYVOICE2_SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endofprompt|>",
    "[breath]",
    "<strong>",
    "</strong>",
    "[noise]",
    "[laughter]",
    "[cough]",
    "[clucking]",
    "[accent]",
    "[quick_breath]",
    "<laughter>",
    "</laughter>",
    "[hissing]",
    "[sigh]",
    "[vocalized-noise]",
    "[lipsmack]",
    "[mn]",
]
_CMU_PHONES = _words(
    "AA AA0 AA1 AA2 AE AE0 AE1 AE2 AH AH0 AH1 AH2 AO AO0 AO1 AO2 AW AW0 AW1 AW2 AY AY0 AY1 AY2 B CH D DH "
    "EH EH0 EH1 EH2 ER ER0 ER1 ER2 EY EY0 EY1 EY2 F G HH IH IH0 IH1 IH2 IY IY0 IY1 IY2 JH K L M N NG "
    "OW OW0 OW1 OW2 OY OY0 OY1 OY2 P R S SH T TH UH UH0 UH1 UH2 UW UW0 UW1 UW2 V W Y Z ZH"
)
_PINYIN_UNITS = _words(
    "a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié "
    "iòng ióng iù iú iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s "
    "sh t u uang ue un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī "
    "uō uǎ uǎi uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào á ái án áng áo è èi èn èng èr é éi én éng "
    "ér ì ìn ìng í ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn "
    "īng ō ōng ōu ū ūn ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ"
)
# CosyVoice3 appends the system-prompt end marker, CMU phones and pinyin units (pronunciation hotfix).
COSYVOICE3_SPECIALS = [
    *COSYVOICE2_SPECIALS,
    "<|endofsystem|>",
    *(f"[{p}]" for p in _CMU_PHONES),
    *(f"[{p}]" for p in _PINYIN_UNITS),
]
_QWEN_SPECIALS = {"cosyvoice2": COSYVOICE2_SPECIALS, "cosyvoice3": COSYVOICE3_SPECIALS}


# Whisper's task tokens, which both tiktoken vocabularies place after their language (and tag) tokens.
_WHISPER_TASKS = ("translate", "transcribe", "startoflm", "startofprev", "nospeech", "notimestamps")


def _timestamps() -> list[str]:
    return [f"<|{i * 0.02:.2f}|>" for i in range(1501)]


def whisper_special_tokens(num_languages: int = 100) -> list[str]:
    """Whisper's special tokens in id order (they follow the last BPE rank)."""
    languages = [f"<|{lang}|>" for lang in LANGUAGES[:num_languages]]
    return ["<|endoftext|>", "<|startoftranscript|>", *languages, *(f"<|{t}|>" for t in _WHISPER_TASKS), *_timestamps()]


def cosyvoice_special_tokens(num_languages: int = 100) -> list[str]:
    """The v1-25Hz tokenizer's special tokens in id order (spec §6.2)."""
    tags = [f"<|{t}|>" for t in (*_COSYVOICE_EVENT_TAGS, *_COSYVOICE_EMOTION_TAGS)]
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{lang}|>" for lang in LANGUAGES[:num_languages]),
        *tags,
        *(f"<|{t}|>" for t in _WHISPER_TASKS),
        *(f"<|SPECIAL_TOKEN_{i}|>" for i in range(1, 31)),
        *(f"<|{t}|>" for t in _COSYVOICE_TTS_TAGS),
        *_timestamps(),
    ]


def has_token(tokenizer: TextTokenizer, token: str) -> bool:
    """Whether ``token`` (e.g. an inline pronunciation token ``[óng]``) is one token of ``tokenizer``: one of
    its special tokens where it lists them, else what encodes to a single id."""
    specials = getattr(tokenizer, "special_tokens", None)
    if isinstance(specials, dict):
        return token in specials
    return len(tokenizer.encode(token)) == 1


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class TiktokenTokenizer:
    """tiktoken BPE whose special tokens are numbered right after the last rank."""

    def __init__(self, name: str, ranks_path: Path, specials: list[str]) -> None:
        ranks = _read_tiktoken_ranks(ranks_path)
        first = len(ranks)
        self.special_tokens = {tok: first + i for i, tok in enumerate(specials)}
        self._encoding = tiktoken.Encoding(
            name=name, pat_str=_TIKTOKEN_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.n_vocab: int = self._encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special="all")


class QwenTokenizer:
    """Qwen2 byte-level BPE (NFC, Qwen2 regex) with the CosyVoice special tokens added.

    Reproduces ``AutoTokenizer.from_pretrained(BlankEN)`` (converted from the slow tokenizer) followed
    by ``add_special_tokens`` without needing ``transformers``.
    """

    def __init__(self, token_dir: Path, version: str = "cosyvoice2") -> None:
        if version not in _QWEN_SPECIALS:
            raise ConfigError(
                f"get_qwen_tokenizer: unknown version '{version}' (expected one of {sorted(_QWEN_SPECIALS)})"
            )
        vocab = _read_json(token_dir / "vocab.json")
        merges = _read_merges(token_dir / "merges.txt")
        declared = _declared_added_tokens(token_dir / "tokenizer_config.json")
        # Declared added tokens keep their configured ids: put them in the model vocabulary (BPE can
        # never produce them, no merge leads there) so the library does not renumber them.
        for idx, tok in declared.items():
            vocab.setdefault(tok["content"], idx)
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tokenizer.add_special_tokens(
            [_added(tok["content"], tok) for _, tok in sorted(declared.items())]
            + [_added(t) for t in ("<|endoftext|>", *_QWEN_SPECIALS[version])]
        )
        for idx, tok in declared.items():
            if tokenizer.token_to_id(tok["content"]) != idx:
                raise ModelLoadError(
                    f"{token_dir / 'tokenizer_config.json'}: added token {tok['content']!r} not at id {idx}"
                )
        self._tokenizer = tokenizer
        self.version = version
        self.special_tokens = {t: tokenizer.token_to_id(t) for t in ("<|endoftext|>", *_QWEN_SPECIALS[version])}
        self.n_vocab: int = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids


def _added(content: str, spec: dict[str, Any] | None = None) -> AddedToken:
    spec = spec or {}
    return AddedToken(
        content,
        single_word=bool(spec.get("single_word", False)),
        lstrip=bool(spec.get("lstrip", False)),
        rstrip=bool(spec.get("rstrip", False)),
        normalized=bool(spec.get("normalized", False)),
        special=True,
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"tokenizer file missing: {path}") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read tokenizer file {path}: {exc}") from exc


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise ModelLoadError(f"tokenizer file missing: {path}") from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot read tokenizer file {path}: {exc}") from exc
    merges = []
    for i, line in enumerate(lines):
        line = line.strip()
        if not line or (i == 0 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ModelLoadError(f"{path}: line {i + 1} is not a merge pair")
        merges.append((parts[0], parts[1]))
    return merges


def _declared_added_tokens(path: Path) -> dict[int, dict[str, Any]]:
    config = _read_json(path)
    decoder = config.get("added_tokens_decoder", {}) if isinstance(config, dict) else {}
    return {int(idx): tok for idx, tok in decoder.items()}


def _tiktoken_args(node: Node) -> int:
    if not node.get("multilingual", True):
        raise ConfigError(f"{node.target}: only the multilingual tokenizer is supported")
    # Defaults as in each get_tokenizer (whisper's own default leaves out yue); the yamls pass 100.
    num_languages = int(node.get("num_languages", 99 if node.target == WHISPER_TARGET else 100))
    if not 0 < num_languages <= len(LANGUAGES):
        raise ConfigError(f"{node.target}: num_languages must be in 1..{len(LANGUAGES)}")
    return num_languages


def load_tokenizer(config: dict[str, Any], model_dir: Path) -> TextTokenizer:
    """Build the text tokenizer named by ``config['get_tokenizer']`` (the parsed model yaml)."""
    node = config.get("get_tokenizer")
    if not isinstance(node, Node):
        raise ConfigError("the model yaml has no 'get_tokenizer' entry")
    if node.target == WHISPER_TARGET:
        path = asset_path(TIKTOKEN_ASSETS[WHISPER_TARGET])
        return TiktokenTokenizer("multilingual", path, whisper_special_tokens(_tiktoken_args(node)))
    if node.target == COSYVOICE_TARGET:
        path = asset_path(TIKTOKEN_ASSETS[COSYVOICE_TARGET])
        return TiktokenTokenizer("cosyvoice", path, cosyvoice_special_tokens(_tiktoken_args(node)))
    if node.target == QWEN_TARGET:
        return QwenTokenizer(Path(model_dir) / "CosyVoice-BlankEN", str(node.get("version", "cosyvoice2")))
    raise ConfigError(f"unsupported tokenizer '{node.target}' in get_tokenizer")
