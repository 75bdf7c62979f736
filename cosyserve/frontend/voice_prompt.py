"""A voice's conditioning: what a prompt recording (or a built-in speaker) gives every synthesis in its voice.

:class:`VoicePrompt` is computed once by the frontend from a recording, stored in the voice library
(:meth:`VoicePrompt.to_bytes`) or read from a model's ``spk2info.pt`` (:meth:`VoicePrompt.from_fields`),
and turned into per-segment model inputs by :class:`~cosyserve.frontend.frontend.Frontend`.

Its speech tokens and text ids belong to the model family and speech-token rate that made them, so
it names both. Stored bytes are read with ``torch.load(weights_only=True)``: no code runs when a
voice is read. Besides its own format, :meth:`VoicePrompt.from_bytes` reads what earlier cosyserve
versions stored (the reference's field dict, with the family, rate and transcript kept beside it).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

FORMAT = "cosyserve.voice"
FORMAT_VERSION = 1
# The tensors of the format, by attribute.
_TENSORS = ("embedding", "speech_token", "speech_feat", "prompt_text_ids")


@dataclass(frozen=True, eq=False)
class VoicePrompt:
    """One voice. ``embedding``: the speaker x-vector (1, 192) float32 (the v1 LLM's and every flow's).

    A voice made from a recording also holds its speech tokens ``speech_token`` (1, P) int32 (the LLM's
    and the flow's prompt) and its mel ``speech_feat`` (1, T, 80) float32; a built-in speaker of an
    -SFT model holds only the embedding. ``prompt_text`` is the recording's transcript as given, and
    ``prompt_text_ids`` (1, L) int32 what the LLM reads for it (normalised, v3: with the system prompt).
    Tensors are normalised to those dtypes and shapes on construction.
    """

    family: str
    token_rate: int
    embedding: Tensor
    speech_token: Tensor | None = None
    speech_feat: Tensor | None = None
    prompt_text: str | None = None
    prompt_text_ids: Tensor | None = None

    def __post_init__(self) -> None:
        embedding = torch.as_tensor(self.embedding).to(torch.float32).reshape(1, -1)
        if embedding.shape[1] == 0:
            raise ValueError("a voice needs a speaker embedding")
        object.__setattr__(self, "embedding", embedding)
        if (self.speech_token is None) != (self.speech_feat is None):
            raise ValueError("a voice's prompt speech tokens and prompt mel go together")
        if self.speech_token is not None:
            object.__setattr__(self, "speech_token", _ids(self.speech_token))
            feat = torch.as_tensor(self.speech_feat).to(torch.float32)
            if feat.dim() != 3 or feat.shape[0] != 1:
                raise ValueError(f"a voice's prompt mel is (1, frames, channels), not {tuple(feat.shape)}")
            object.__setattr__(self, "speech_feat", feat)
        if self.prompt_text_ids is not None:
            object.__setattr__(self, "prompt_text_ids", _ids(self.prompt_text_ids))

    @property
    def has_prompt(self) -> bool:
        """Made from a recording (speech tokens and mel), not only a speaker embedding."""
        return self.speech_token is not None

    @property
    def has_transcript(self) -> bool:
        """Its recording's transcript is known, so the LLM can continue after it (zero_shot)."""
        return self.prompt_text_ids is not None and self.prompt_text_ids.numel() > 0

    def with_transcript(self, prompt_text: str, prompt_text_ids: Tensor) -> VoicePrompt:
        return replace(self, prompt_text=prompt_text, prompt_text_ids=prompt_text_ids)

    def to(self, device: torch.device | str) -> VoicePrompt:
        """The same voice with its tensors on ``device`` (itself when they are there already)."""
        moved = {name: getattr(self, name) for name in _TENSORS if getattr(self, name) is not None}
        moved = {name: t.to(device) for name, t in moved.items()}
        if all(moved[name] is getattr(self, name) for name in moved):
            return self
        return replace(self, **moved)

    # -- the reference's field dict (spk2info.pt) ----------------------------------------------

    def field_names(self) -> tuple[str, ...]:
        """The keys :meth:`as_fields` has (what the voice library lists for a voice)."""
        return tuple(self.as_fields())

    def as_fields(self) -> dict[str, Tensor]:
        """The voice in the reference's ``spk2info.pt`` layout: ``{"embedding"}`` for a speaker, the
        ``add_zero_shot_spk`` fields (``*_len`` included) for a voice made from a recording."""
        if self.speech_token is None or self.speech_feat is None:
            return {"embedding": self.embedding}
        out: dict[str, Tensor] = {}
        if self.has_transcript:
            out["prompt_text"] = self.prompt_text_ids
        out["llm_prompt_speech_token"] = self.speech_token
        out["flow_prompt_speech_token"] = self.speech_token
        out["prompt_speech_feat"] = self.speech_feat
        for key in list(out):
            out[key + "_len"] = torch.tensor([out[key].shape[1]], dtype=torch.int32)
        out["llm_embedding"] = self.embedding
        out["flow_embedding"] = self.embedding
        return out

    @classmethod
    def from_fields(
        cls, entry: Mapping[str, Tensor], family: str, token_rate: int, prompt_text: str | None = None
    ) -> VoicePrompt:
        """A voice from the reference's field dict: a ``spk2info.pt`` entry (a speaker's ``embedding``,
        or an ``add_zero_shot_spk`` voice), or what earlier cosyserve versions stored. ``*_len`` fields
        are implied by the shapes. ValueError when the entry is not a voice or its LLM and flow copies
        differ (the reference makes them equal; one is kept)."""
        embedding = _one(entry, ("flow_embedding", "llm_embedding", "embedding"), torch.float32)
        if embedding is None:
            raise ValueError("the entry has no speaker embedding")
        token = _one(entry, ("flow_prompt_speech_token", "llm_prompt_speech_token"), torch.int32)
        feat = entry.get("prompt_speech_feat")
        ids = entry.get("prompt_text")
        return cls(family, token_rate, embedding, token, feat, prompt_text, None if ids is None else _ids(ids))

    # -- bytes ---------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The voice as ``torch.save`` bytes of plain values (read back by :meth:`from_bytes`)."""
        record: dict[str, object] = {"format": FORMAT, "version": FORMAT_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.detach().cpu().contiguous()
            if value is not None:
                record[f.name] = value
        out = io.BytesIO()
        torch.save(record, out)
        return out.getvalue()

    @classmethod
    def from_bytes(
        cls, data: bytes, *, family: str = "", token_rate: int = 0, prompt_text: str | None = None
    ) -> VoicePrompt:
        """A voice from :meth:`to_bytes` bytes, or from a field dict as earlier versions stored it
        (which holds no family, rate or transcript: the keyword arguments give them). Never runs code;
        ValueError for anything else."""
        try:
            record = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"unreadable: {exc}") from exc
        if not isinstance(record, dict):
            raise ValueError(f"not a voice but a {type(record).__name__}")
        if record.get("format") != FORMAT:
            if not all(isinstance(v, Tensor) for v in record.values()):
                raise ValueError("not a voice: neither cosyserve's format nor a dictionary of tensors")
            return cls.from_fields(record, family, token_rate, prompt_text)
        if not isinstance(record.get("version"), int) or record["version"] > FORMAT_VERSION:
            raise ValueError(f"written by a newer cosyserve (voice format {record.get('version')})")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in record.items() if k in known})
        except TypeError as exc:
            raise ValueError(f"incomplete voice: {exc}") from exc


def _ids(value: object) -> Tensor:
    return torch.as_tensor(value).to(torch.int32).reshape(1, -1)


def _one(entry: Mapping[str, Tensor], keys: tuple[str, ...], dtype: torch.dtype) -> Tensor | None:
    """The one value of the copies ``keys`` present in ``entry`` (None if none is)."""
    present = [torch.as_tensor(entry[k]).to(dtype).reshape(1, -1) for k in keys if k in entry]
    for other in present[1:]:
        if other.shape != present[0].shape or not torch.equal(other, present[0]):
            raise ValueError(f"its {' and '.join(k for k in keys if k in entry)} differ")
    return present[0] if present else None
