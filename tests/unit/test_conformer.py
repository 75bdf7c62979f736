"""Chunk masks, relative-position attention with a KV cache, and the encoders built on them."""

from __future__ import annotations

import pytest
import torch

from cosyserve.config import ConfigError, Node
from cosyserve.models.config_checks import encoder_config
from cosyserve.nn.attention import chunk_mask, padding_mask
from cosyserve.nn.conformer import ConformerEncoder, PreLookaheadLayer, TransformerEncoder, UpsampleConformerEncoder


def _seeded(build, seed: int = 0):
    """Build a module with random init drawn from a forked RNG, randomising the zero-init biases too."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = build()
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("size", [1, 5, 12])
@pytest.mark.parametrize("chunk", [0, 1, 3, 25])
def test_chunk_mask(size, chunk):
    mask = chunk_mask(size, chunk)
    assert mask.shape == (size, size) and mask.dtype == torch.bool
    for i in range(size):
        for j in range(size):
            allowed = True if chunk == 0 else j < (i // chunk + 1) * chunk
            assert bool(mask[i, j]) == allowed
    if chunk == 1:
        assert torch.equal(mask, torch.ones(size, size, dtype=torch.bool).tril())


def test_padding_mask():
    mask = padding_mask(torch.tensor([3, 1]), 4)
    assert mask.shape == (2, 1, 4)
    assert mask.tolist() == [[[True, True, True, False]], [[True, False, False, False]]]


def test_kv_cache_decoding_matches_the_causal_forward():
    enc = _seeded(
        lambda: TransformerEncoder(8, 16, attention_heads=4, linear_units=32, num_blocks=2, static_chunk_size=1)
    )
    xs = _randn(1, 11, 8)
    with torch.inference_mode():
        full, _ = enc(xs, torch.tensor([11]))
        cache = enc.new_cache()
        pieces = [enc.forward_chunk(xs[:, :5], cache)]  # prefill
        pieces += [enc.forward_chunk(xs[:, t : t + 1], cache) for t in range(5, 8)]  # single steps
        pieces.append(enc.forward_chunk(xs[:, 8:], cache))  # a multi-position chunk after a cache
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_ragged_batch_decoding_matches_each_row_alone():
    """Rows of different lengths decoded as one batch read their own relative distances."""
    enc = _seeded(lambda: TransformerEncoder(8, 16, attention_heads=4, linear_units=32, num_blocks=2))
    prefixes = [_randn(1, n, 8) for n in (4, 9, 1)]
    step = _randn(3, 1, 8)
    with torch.inference_mode():
        batch, solo = enc.new_cache(), []
        for p in prefixes:
            row = enc.new_cache()
            enc.forward_chunk(p, row)
            batch.add_row(row)
            alone = enc.new_cache()
            enc.forward_chunk(p, alone)
            solo.append(alone)
        batched = enc.forward_chunk(step, batch)
        for b, alone in enumerate(solo):
            torch.testing.assert_close(batched[b], enc.forward_chunk(step[b : b + 1], alone)[0], atol=1e-5, rtol=0)
    assert batch.lengths == [5, 10, 2]


def test_conformer_causal_and_padding():
    enc = _seeded(
        lambda: ConformerEncoder(6, 16, attention_heads=2, linear_units=24, num_blocks=2, static_chunk_size=1)
    )
    xs = _randn(2, 7, 6)
    with torch.inference_mode():
        out, mask = enc(xs, torch.tensor([7, 4]))
        changed = xs.clone()
        changed[:, 5:] += 1.0
        out2, _ = enc(changed, torch.tensor([7, 4]))
    assert out.shape == (2, 7, 16) and mask.shape == (2, 1, 7)
    torch.testing.assert_close(out2[:, :5], out[:, :5])  # causal: the past ignores the future
    assert not torch.allclose(out2[0, 5:], out[0, 5:])
    # Row 1 has length 4: its padded tail is not attended to, so its valid part equals a batch of one.
    with torch.inference_mode():
        alone, _ = enc(xs[1:, :4], torch.tensor([4]))
    torch.testing.assert_close(out[1:, :4], alone, atol=1e-5, rtol=0)


def test_parameter_names():
    conf = ConformerEncoder(6, 16, attention_heads=2, linear_units=24, num_blocks=1).state_dict()
    trans = TransformerEncoder(6, 16, attention_heads=2, linear_units=24, num_blocks=1).state_dict()
    attn = {f"encoders.0.self_attn.{n}" for n in ("pos_bias_u", "pos_bias_v", "linear_pos.weight")}
    attn |= {f"encoders.0.self_attn.linear_{n}.{w}" for n in "qkv" for w in ("weight", "bias")}
    common = {"embed.out.0.weight", "embed.out.0.bias", "embed.out.1.weight", "embed.out.1.bias", "after_norm.weight"}
    assert attn | common | {"encoders.0.norm_mha.weight", "encoders.0.norm_ff.bias"} <= set(conf)
    assert attn | common | {"encoders.0.norm1.weight", "encoders.0.norm2.bias"} <= set(trans)
    assert "encoders.0.feed_forward.w_1.weight" in conf and "encoders.0.feed_forward.w_2.bias" in trans
    up = UpsampleConformerEncoder(16, 16, attention_heads=2, linear_units=24, num_blocks=1).state_dict()
    assert {k.split(".")[0] for k in up} == {
        "embed",
        "pre_lookahead_layer",
        "encoders",
        "up_layer",
        "up_embed",
        "up_encoders",
        "after_norm",
    }
    assert {
        "embed.out.0.weight",
        "embed.out.1.bias",
        "pre_lookahead_layer.conv1.weight",
        "pre_lookahead_layer.conv2.bias",
        "encoders.0.norm_mha.weight",
        "up_layer.conv.weight",
        "up_embed.out.0.weight",
        "up_embed.out.1.weight",
        "up_encoders.3.self_attn.pos_bias_u",
        "after_norm.weight",
    } <= set(up)
    assert "up_encoders.4.norm_ff.weight" not in up  # four up-blocks, fixed by the reference


def test_pre_lookahead_sees_three_frames_ahead():
    layer = _seeded(lambda: PreLookaheadLayer(4, 8, pre_lookahead_len=3))
    x = _randn(1, 12, 4)
    with torch.inference_mode():
        base = layer(x)
        for t in range(12):
            bumped = x.clone()
            bumped[:, t] += 1.0
            diff = (layer(bumped) - base).abs().sum(-1)[0]
            # position s sees s .. s+3 directly (conv1) and s-2 .. s through conv2.
            affected = {s for s in range(12) if t - 3 <= s <= t + 2}
            assert {s for s in range(12) if diff[s] > 0} == affected
        # Look-ahead context frames play the role of the frames that follow.
        with_context = layer(x[:, :9], x[:, 9:])
    torch.testing.assert_close(with_context, base[:, :9])
    assert base.shape == x.shape


def test_upsample_encoder_shapes_and_streaming_chunks():
    enc = _seeded(
        lambda: UpsampleConformerEncoder(
            8, 16, attention_heads=2, linear_units=24, num_blocks=1, static_chunk_size=4, up_num_blocks=2
        )
    )
    xs = _randn(1, 12, 8)
    with torch.inference_mode():
        out, mask = enc(xs, torch.tensor([12]))
        assert out.shape == (1, 24, 16) and mask.shape == (1, 1, 24) and bool(mask.all())
        stream, _ = enc(xs, torch.tensor([12]), streaming=True)
        changed = xs.clone()
        changed[:, 7:] += 1.0  # beyond chunk 0 (tokens 0..3) and its 3-token look-ahead
        stream2, _ = enc(changed, torch.tensor([12]), streaming=True)
        full2, _ = enc(changed, torch.tensor([12]))
        # Whole chunks followed by their look-ahead tokens as context match the longer input.
        ctx_out, _ = enc(xs[:, :8], torch.tensor([8]), context=xs[:, 8:11], streaming=True)
    torch.testing.assert_close(stream2[:, :8], stream[:, :8])  # first chunk = 8 frames after x2
    assert not torch.allclose(full2[:, :8], out[:, :8])  # without streaming everything is seen
    assert ctx_out.shape == (1, 16, 16)
    torch.testing.assert_close(ctx_out, stream[:, :16], atol=1e-5, rtol=0)


def _encoder_node(cls: type, **args) -> Node:
    return Node("new", f"cosyvoice.transformer.encoder.{cls.__name__}", args)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_cnn_module", True),
        ("macaron_style", True),
        ("pos_enc_layer_type", "rel_pos"),
        ("selfattention_layer_type", "selfattn"),
        ("input_layer", "conv2d"),
        ("activation_type", "tanh"),
        ("use_dynamic_chunk", True),
        ("mystery_option", 1),
    ],
)
def test_unsupported_options_raise_config_error_naming_the_key(key, value):
    for cls in (ConformerEncoder, TransformerEncoder, UpsampleConformerEncoder):
        node = _encoder_node(cls, input_size=8, output_size=16, attention_heads=2, **{key: value})
        with pytest.raises(ConfigError, match=key):
            encoder_config(node, "flow.encoder", cls.__name__)


@pytest.mark.parametrize(("key", "value"), [("input_layer", "conv2d"), ("activation_type", "tanh")])
def test_blocks_refuse_what_they_cannot_build(key, value):
    for cls in (ConformerEncoder, TransformerEncoder, UpsampleConformerEncoder):
        with pytest.raises(ValueError, match=key):
            cls(input_size=8, output_size=16, attention_heads=2, **{key: value})


def test_training_only_options_are_accepted():
    node = _encoder_node(
        ConformerEncoder,
        input_size=8,
        output_size=16,
        attention_heads=2,
        dropout_rate=0.1,
        positional_dropout_rate=0.1,
        attention_dropout_rate=0.0,
        use_cnn_module=False,
        macaron_style=False,
        use_dynamic_chunk=False,
        use_dynamic_left_chunk=False,
        pos_enc_layer_type="rel_pos_espnet",
        selfattention_layer_type="rel_selfattn",
    )
    config = encoder_config(node, "llm.text_encoder", "ConformerEncoder")
    assert dict(config.args) == {"input_size": 8, "output_size": 16, "attention_heads": 2}
    assert config.output_size == 16 and isinstance(config.build(), ConformerEncoder)
