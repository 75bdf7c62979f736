"""v2 flow ``CausalMaskedDiffWithXvec``: speech tokens -> mel at exactly 2 frames per token (spec §11).

Relative to v1: the up-sampling conformer (x2 in time, with 3 look-ahead tokens) replaces the
conformer + interpolation, and a causal U-Net starts from the fixed noise buffer (:class:`CausalFlow`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cosyserve.models.cosyvoice2.config import V2FlowConfig
from cosyserve.models.flow import CausalFlow
from cosyserve.nn.conformer import EncoderStream
from cosyserve.nn.flow_matching import FlowStream
from cosyserve.nn.unet import ConditionalDecoder


class CausalMaskedDiffWithXvec(CausalFlow):
    def __init__(self, config: V2FlowConfig) -> None:
        super().__init__(config, ConditionalDecoder(**config.estimator))
        self.input_frame_rate = config.input_frame_rate
        self.encoder = config.encoder.build()
        self.encoder_proj = nn.Linear(config.encoder.output_size, config.output_size)

    def encode(self, emb: Tensor, n_prompt: int, prompt_frames: int, finalize: bool, streaming: bool) -> Tensor:
        """Up-sampling conformer over the tokens, look-ahead tokens as right context (spec §11.3)."""
        emb, context = self.split_lookahead(emb, finalize)
        lens = torch.tensor([emb.size(1)], device=emb.device)
        h, _ = self.encoder(emb, lens, context=context, streaming=streaming)  # (1, 2 (P+N[-3]), 512)
        return self.encoder_proj(h)

    def encode_stream(
        self, emb: Tensor, n_prompt: int, prompt_frames: int, finalize: bool, state: FlowStream
    ) -> Tensor:
        """:meth:`encode` (streaming), encoding only the tokens after those of the request's earlier calls."""
        emb, context = self.split_lookahead(emb, finalize)
        if not isinstance(state.encoder, EncoderStream):
            state.encoder = EncoderStream(self.encoder)
        return self.encoder_proj(self.encoder.forward_stream(emb, context, state.encoder))
