"""Text frontend: normalisation, sentence splitting and the text tokenizers."""

from cosyserve.text.normalize import TextNormalizer, contains_chinese, split_paragraph
from cosyserve.text.tokenizers import TextTokenizer, load_tokenizer

__all__ = ["TextNormalizer", "TextTokenizer", "contains_chinese", "load_tokenizer", "split_paragraph"]
