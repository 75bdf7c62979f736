"""Transformer / Conformer encoders as configured in CosyVoice (spec §8.2, §8.3, §11.2).

Everywhere in CosyVoice the Conformer runs with the macaron FFN and the convolution module off,
so both encoder kinds are pre-norm transformer stacks with relative-position attention; they
differ only in parameter names (norm_mha/norm_ff vs norm1/norm2) and default activation.
Constructors take the sizes only; the yaml's other keys (training-only ones, options fixed to the
values above) are checked in :mod:`cosyserve.models.config_checks`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.nn.attention import (
    LayerCache,
    RelPositionalEncoding,
    RelPositionMultiHeadedAttention,
    chunk_mask,
    padding_mask,
)
from cosyserve.nn.chunk_state import ChunkState, left_context
from cosyserve.nn.kv_cache import KVCache

ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU}
INPUT_LAYERS = ("linear", "linear_legacy")


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation_type={name!r}")
    return ACTIVATIONS[name]()


class LinearInput(nn.Module):
    """Linear -> LayerNorm(eps 1e-5) [-> ReLU for 'linear_legacy'], then x * sqrt(D).

    The Sequential indices match the reference keys ``out.0`` (Linear) and ``out.1`` (LayerNorm).
    """

    def __init__(self, idim: int, odim: int, legacy: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5)]
        if legacy:
            layers.append(nn.ReLU())
        self.out = nn.Sequential(*layers)
        self.pos_enc = RelPositionalEncoding(odim)

    def forward(self, x: Tensor) -> Tensor:
        return self.pos_enc(self.out(x))


def _input_layer(kind: str, idim: int, odim: int) -> LinearInput:
    if kind not in INPUT_LAYERS:
        raise ValueError(f"unsupported input_layer={kind!r} (supported: {', '.join(INPUT_LAYERS)})")
    return LinearInput(idim, odim, legacy=kind == "linear_legacy")


class PositionwiseFeedForward(nn.Module):
    def __init__(self, idim: int, hidden: int, activation: nn.Module) -> None:
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden)
        self.activation = activation
        self.w_2 = nn.Linear(hidden, idim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.activation(self.w_1(x)))


def _pre_norm_block(
    x: Tensor,
    norm_att: nn.LayerNorm,
    attn: RelPositionMultiHeadedAttention,
    norm_ff: nn.LayerNorm,
    ff: PositionwiseFeedForward,
    mask: Tensor | None,
    pos_seq: Tensor,
    cache: LayerCache | None,
) -> Tensor:
    x = x + attn(norm_att(x), mask, pos_seq, cache)
    return x + ff(norm_ff(x))


class ConformerEncoderLayer(nn.Module):
    """Conformer layer without macaron FFN and convolution: a pre-norm transformer layer."""

    def __init__(self, size: int, heads: int, units: int, activation: nn.Module, key_bias: bool = True) -> None:
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(heads, size, key_bias)
        self.feed_forward = PositionwiseFeedForward(size, units, activation)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)

    def forward(self, x: Tensor, mask: Tensor | None, pos_seq: Tensor, cache: LayerCache | None = None) -> Tensor:
        return _pre_norm_block(x, self.norm_mha, self.self_attn, self.norm_ff, self.feed_forward, mask, pos_seq, cache)


class TransformerEncoderLayer(nn.Module):
    """Same math as :class:`ConformerEncoderLayer`, reference names ``norm1``/``norm2``."""

    def __init__(self, size: int, heads: int, units: int, activation: nn.Module, key_bias: bool = True) -> None:
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(heads, size, key_bias)
        self.feed_forward = PositionwiseFeedForward(size, units, activation)
        self.norm1 = nn.LayerNorm(size, eps=1e-12)
        self.norm2 = nn.LayerNorm(size, eps=1e-12)

    def forward(self, x: Tensor, mask: Tensor | None, pos_seq: Tensor, cache: LayerCache | None = None) -> Tensor:
        return _pre_norm_block(x, self.norm1, self.self_attn, self.norm2, self.feed_forward, mask, pos_seq, cache)


def _run_layers(layers: nn.ModuleList, x: Tensor, mask: Tensor, pos_enc: RelPositionalEncoding) -> Tensor:
    t = x.size(1)
    pos_seq = pos_enc.sequence(t - 1, -(t - 1), x)
    for layer in layers:
        x = layer(x, mask, pos_seq)
    return x


def _run_layers_cached(
    layers: nn.ModuleList, x: Tensor, cache: KVCache, chunk: int, pos_enc: RelPositionalEncoding
) -> Tensor:
    """The chunk-masked ``_run_layers`` of T new positions after the ``cache``'s (one row), extending it."""
    t = x.size(1)
    cached = cache.length
    keys = cached + t
    mask = chunk_mask(keys, chunk, x.device)[cached:].unsqueeze(0)  # (1, T, S)
    pos_seq = pos_enc.sequence(keys - 1, -(t - 1), x)
    for i, layer in enumerate(layers):
        x = layer(x, mask, pos_seq, LayerCache(cache, i))
    cache.advance(t)
    return x


def _attention_mask(pad: Tensor, chunk: int) -> Tensor:
    """Padding mask (B, 1, T) AND'ed with the static chunk mask when chunk > 0."""
    if chunk <= 0:
        return pad
    return pad & chunk_mask(pad.size(-1), chunk, pad.device).unsqueeze(0)


class _Encoder(nn.Module):
    """embed -> layers -> after_norm, with a full-sequence forward and an incremental one."""

    layer_class: type[nn.Module]
    default_activation: str
    default_input_layer: str

    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        input_layer: str | None = None,
        static_chunk_size: int = 0,
        activation_type: str | None = None,
        key_bias: bool = True,
    ) -> None:
        super().__init__()
        activation = activation_type or self.default_activation
        self.output_size = output_size
        self.static_chunk_size = static_chunk_size
        self.embed = _input_layer(input_layer or self.default_input_layer, input_size, output_size)
        self.encoders = nn.ModuleList(
            self.layer_class(output_size, attention_heads, linear_units, _activation(activation), key_bias)
            for _ in range(num_blocks)
        )
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

    def forward(self, xs: Tensor, xs_lens: Tensor) -> tuple[Tensor, Tensor]:
        """xs (B, T, D_in), xs_lens (B,) -> (out (B, T, D), padding mask (B, 1, T) bool).

        With static_chunk_size c > 0 each position sees every earlier chunk and its own (c = 1 is
        causal), as the reference does at inference.
        """
        pad = padding_mask(xs_lens, xs.size(1))
        x = self.embed(xs)
        x = _run_layers(self.encoders, x, _attention_mask(pad, self.static_chunk_size), self.embed.pos_enc)
        return self.after_norm(x), pad

    def new_cache(self) -> KVCache:
        return KVCache(len(self.encoders))

    def forward_chunk(self, xs: Tensor, cache: KVCache, att_mask: Tensor | None = None) -> Tensor:
        """Run T new positions after each row's cached ones; the cache is extended in place.

        xs (B, T, D_in) -> (B, T, D). ``att_mask`` (B, T|1, S) with S = cached + T keys; None means
        causal: every new position sees the whole cache and the new positions up to itself.
        Relative distances continue seamlessly from the cached positions. Rows of different lengths
        (a decode batch) take one new position each.
        """
        t = xs.size(1)
        x = self.embed(xs)
        if cache.uniform:
            cached = cache.lengths[0] if cache.rows else 0
            s = cached + t
            if att_mask is None and t > 1:
                att_mask = torch.ones(t, s, dtype=torch.bool, device=xs.device).tril(cached).unsqueeze(0)
            pos_seq = self.embed.pos_enc.sequence(s - 1, -(t - 1), x)
        else:
            s = max(cache.lengths) + t
            att_mask = cache.key_mask(t, xs.device)[:, 0]  # (B, 1, S)
            pos_seq = self.embed.pos_enc.sequence(s - 1, 0, x)
        for i, layer in enumerate(self.encoders):
            x = layer(x, att_mask, pos_seq, LayerCache(cache, i))
        cache.advance(t)
        return self.after_norm(x)


class ConformerEncoder(_Encoder):
    """Reference ``ConformerEncoder`` (macaron off, conv module off); FFN activation SiLU by default."""

    layer_class = ConformerEncoderLayer
    default_activation = "swish"
    default_input_layer = "linear"


class TransformerEncoder(_Encoder):
    """Reference ``TransformerEncoder`` (v1 LM body); FFN activation ReLU by default."""

    layer_class = TransformerEncoderLayer
    default_activation = "relu"
    default_input_layer = "linear_legacy"


class PreLookaheadLayer(nn.Module):
    """Residual look-ahead convolution: each output frame sees itself and the next ``pre_lookahead_len``.

    conv1 (kernel L+1, valid) over the input with L frames of right context (given, else zeros)
    -> LeakyReLU(0.01) -> conv2 (kernel 3, causal left padding) -> + input.
    """

    def __init__(self, in_channels: int, channels: int, pre_lookahead_len: int = 3) -> None:
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, in_channels, kernel_size=3)

    def forward(self, x: Tensor, context: Tensor | None = None, earlier: ChunkState | None = None) -> Tensor:
        """x (B, T, C), context (B, c, C) with c <= pre_lookahead_len frames following x -> (B, T, C).

        ``earlier``: a streamed request's state when x continues the frames of earlier calls (conv2
        then sees their last activations instead of zeros); it is updated."""
        h = x.transpose(1, 2)
        missing = self.pre_lookahead_len
        if context is not None and context.size(1) > 0:
            if context.size(1) > self.pre_lookahead_len:
                raise ValueError(f"look-ahead context of {context.size(1)} frames > {self.pre_lookahead_len}")
            h = torch.cat([h, context.transpose(1, 2).to(h.dtype)], dim=2)
            missing -= context.size(1)
        h = F.pad(h, (0, missing))
        h = F.leaky_relu(self.conv1(h), 0.01)
        keep = self.conv2.kernel_size[0] - 1
        h = self.conv2(F.pad(h, (keep, 0)) if earlier is None else left_context(earlier, self.conv2, h, keep))
        return h.transpose(1, 2) + x


class Upsample1D(nn.Module):
    """Nearest-neighbour x``stride`` repeat, left pad 2*stride, Conv1d(kernel 2*stride + 1)."""

    def __init__(self, channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, out_channels, kernel_size=stride * 2 + 1)

    def forward(self, x: Tensor, lengths: Tensor, earlier: ChunkState | None = None) -> tuple[Tensor, Tensor]:
        """x (B, C, T) -> (B, C', stride*T), lengths * stride. ``earlier`` as in :class:`PreLookaheadLayer`."""
        x = torch.repeat_interleave(x, self.stride, dim=2)
        keep = self.stride * 2
        x = F.pad(x, (keep, 0)) if earlier is None else left_context(earlier, self.conv, x, keep)
        return self.conv(x), lengths * self.stride


class UpsampleConformerEncoder(nn.Module):
    """v2 flow encoder (§11.2): embed -> look-ahead -> conformer -> x2 upsample -> embed -> conformer.

    ``pre_lookahead_len`` and ``up_num_blocks`` are fixed by the reference (3 and 4) and absent
    from the official yaml; they are parameters here only so that they are named.
    """

    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 512,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        static_chunk_size: int = 0,
        pre_lookahead_len: int = 3,
        up_num_blocks: int = 4,
        input_layer: str = "linear",
        activation_type: str = "swish",
        key_bias: bool = True,
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.static_chunk_size = static_chunk_size
        self.embed = _input_layer(input_layer, input_size, output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(output_size, output_size, pre_lookahead_len)

        def layers(n: int) -> nn.ModuleList:
            return nn.ModuleList(
                ConformerEncoderLayer(
                    output_size, attention_heads, linear_units, _activation(activation_type), key_bias
                )
                for _ in range(n)
            )

        self.encoders = layers(num_blocks)
        self.up_layer = Upsample1D(output_size, output_size, stride=2)
        self.up_embed = _input_layer(input_layer, output_size, output_size)
        self.up_encoders = layers(up_num_blocks)
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

    def forward(
        self, xs: Tensor, xs_lens: Tensor, context: Tensor | None = None, streaming: bool = False
    ) -> tuple[Tensor, Tensor]:
        """xs (B, T, D_in), xs_lens (B,), context (B, c, D_in) look-ahead frames or None.

        Returns (out (B, 2T, D), padding mask (B, 1, 2T)). ``streaming`` applies the chunk masks
        (static_chunk_size tokens before, twice that many frames after upsampling).
        """
        pad = padding_mask(xs_lens, xs.size(1))
        x = self.embed(xs)
        if context is not None and context.size(1) > 0:
            context = self.embed(context)
        chunk = self.static_chunk_size if streaming else 0
        x = self.pre_lookahead_layer(x, context)
        x = _run_layers(self.encoders, x, _attention_mask(pad, chunk), self.embed.pos_enc)

        x, lens = self.up_layer(x.transpose(1, 2), xs_lens)
        x = x.transpose(1, 2)
        pad = padding_mask(lens, x.size(1))
        x = self.up_embed(x)
        chunk = chunk * self.up_layer.stride
        x = _run_layers(self.up_encoders, x, _attention_mask(pad, chunk), self.up_embed.pos_enc)
        return self.after_norm(x), pad

    def forward_stream(self, xs: Tensor, context: Tensor | None, stream: EncoderStream) -> Tensor:
        """The streaming :meth:`forward` of a request's tokens so far, encoding only those after ``stream``'s.

        xs (1, T, D_in) all the tokens so far, context as in :meth:`forward` -> (1, 2T, D). With the
        chunk masks the earlier tokens' outputs do not change when tokens are added (their look-ahead
        context was the same tokens), so ``stream`` keeps them with both stacks' keys / values and the
        convolutions' last inputs. Earlier tokens not ending on a chunk boundary are encoded again.
        """
        chunk = self.static_chunk_size
        if chunk <= 0:
            return self.forward(xs, torch.tensor([xs.size(1)], device=xs.device), context, streaming=True)[0]
        if stream.tokens % chunk or stream.tokens > xs.size(1):
            stream.reset()
        start = stream.tokens
        x = self.embed(xs[:, start:])
        if context is not None and context.size(1) > 0:
            context = self.embed(context)
        x = self.pre_lookahead_layer(x, context, stream.convs)
        x = _run_layers_cached(self.encoders, x, stream.encoders, chunk, self.embed.pos_enc)
        lengths = torch.tensor([x.size(1)], device=x.device)
        x = self.up_layer(x.transpose(1, 2), lengths, stream.convs)[0].transpose(1, 2)
        x = self.up_embed(x)
        stride = self.up_layer.stride
        x = _run_layers_cached(self.up_encoders, x, stream.up_encoders, chunk * stride, self.up_embed.pos_enc)
        out = self.after_norm(x)
        stream.output = out if stream.output is None else torch.cat([stream.output, out], dim=1)
        stream.tokens = xs.size(1)
        return stream.output


class EncoderStream:
    """One streamed request's :class:`UpsampleConformerEncoder` state: its tokens encoded so far, their
    outputs, and what later tokens need of them (both stacks' keys / values, the convolutions' last inputs)."""

    def __init__(self, encoder: UpsampleConformerEncoder) -> None:
        self._depths = (len(encoder.encoders), len(encoder.up_encoders))
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.output: Tensor | None = None  # (1, 2 * tokens, D)
        self.encoders = KVCache(self._depths[0])
        self.up_encoders = KVCache(self._depths[1])
        self.convs: ChunkState = {}
