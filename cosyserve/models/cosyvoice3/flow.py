"""v3 flow ``CausalMaskedDiffWithDiT``: speech tokens -> mel (spec §12).

Relative to v2: no conformer encoder. The token embeddings (80-d) go through the pre-lookahead
layer and are repeated ``token_mel_ratio`` times along time; the CFM's estimator is a DiT.
"""

from __future__ import annotations

from torch import Tensor

from cosyserve.models.cosyvoice3.config import V3FlowConfig
from cosyserve.models.flow import CausalFlow
from cosyserve.nn.conformer import PreLookaheadLayer
from cosyserve.nn.dit import DiT


class CausalMaskedDiffWithDiT(CausalFlow):
    def __init__(self, config: V3FlowConfig) -> None:
        super().__init__(config, DiT(**config.estimator))
        self.pre_lookahead_layer = PreLookaheadLayer(
            config.input_size, config.lookahead_channels, config.pre_lookahead_len
        )

    def encode(self, emb: Tensor, n_prompt: int, prompt_frames: int, finalize: bool, streaming: bool) -> Tensor:
        """Look-ahead convolution, each token's vector repeated for its mel frames."""
        emb, context = self.split_lookahead(emb, finalize)
        return self.pre_lookahead_layer(emb, context).repeat_interleave(self.token_mel_ratio, dim=1)
