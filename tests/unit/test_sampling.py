"""Repetition-aware sampling (spec §8.6) and greedy sampling."""

from __future__ import annotations

import pytest
import torch

from cosyserve.config import ConfigError, Node
from cosyserve.models.config_checks import sampling_args
from cosyserve.nn.sampling import GreedySampler, RasSampler


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _logp(probs: list[float], size: int = 16) -> torch.Tensor:
    p = torch.full((size,), 1e-12)
    p[: len(probs)] = torch.tensor(probs)
    return p.log().log_softmax(0)


def _random_logp(seed: int, n: int = 20, size: int = 64) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(size, generator=g).mul(3).log_softmax(0) for _ in range(n)]


def test_seeded_generator_is_reproducible_and_global_rng_untouched():
    rows = _random_logp(0)
    state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        sampler, history = RasSampler(generator=_gen(1234)), []
        for row in rows:
            history.append(sampler(row, history))
        runs.append(history)
    assert runs[0] == runs[1]
    assert torch.equal(torch.get_rng_state(), state)
    other, history = RasSampler(generator=_gen(99)), []
    for row in rows:
        history.append(other(row, history))
    assert history != runs[0]


def test_never_returns_a_masked_id_and_leaves_input_alone():
    sampler = RasSampler(generator=_gen(0))
    history: list[int] = []
    for i, row in enumerate(_random_logp(1, n=200)):
        masked = row.clone()
        banned = masked.topk(3 + i % 5).indices  # the most likely ids, the ones a bug would pick
        masked[banned] = float("-inf")
        before = masked.clone()
        token = sampler(masked, history)
        assert token not in banned.tolist()
        assert torch.equal(masked, before)
        history.append(token)


def test_nucleus_keeps_the_smallest_prefix_reaching_top_p():
    # Masses 0.6, 0.3, 0.1: the running mass before id 2 is 0.9 >= 0.8, so id 2 is never drawn.
    sampler = RasSampler(top_p=0.8, top_k=25, generator=_gen(3))
    drawn = {sampler(_logp([0.6, 0.3, 0.1]), []) for _ in range(300)}
    assert drawn == {0, 1}
    # top_k caps the candidates.
    top1 = RasSampler(top_p=1.0, top_k=1, generator=_gen(3))
    assert {top1(_logp([0.4, 0.35, 0.25]), []) for _ in range(50)} == {0}


def test_repetition_rule_triggers_inside_the_window_only():
    logp = _logp([0.98, 0.02])  # the nucleus always picks id 0
    sampler = RasSampler(win_size=10, tau_r=0.1, generator=_gen(5))
    assert sampler(logp, [3, 4]) == 0
    # id 0 seen once in the last 10 -> banned, re-drawn from the full distribution.
    assert all(sampler(logp, [0] + [5] * 9) != 0 for _ in range(50))
    # The same occurrence just outside the window does not count.
    assert sampler(logp, [0] + [5] * 10) == 0
    # tau_r 0.2 needs two occurrences in the window.
    strict = RasSampler(win_size=10, tau_r=0.2, generator=_gen(5))
    assert strict(logp, [0, 5, 6]) == 0
    assert all(strict(logp, [0, 5, 0]) != 0 for _ in range(50))


def test_repetition_with_nothing_else_allowed_keeps_the_pick():
    logp = torch.full((8,), float("-inf"))
    logp[2] = 0.0
    assert RasSampler(generator=_gen(0))(logp, [2]) == 2


def test_greedy_is_argmax():
    row = _random_logp(7, n=1)[0]
    assert GreedySampler()(row, []) == int(row.argmax())


def test_sampling_args_from_the_yaml():
    node = Node(
        "name", "cosyvoice.utils.common.ras_sampling", {"top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1}
    )
    sampler = RasSampler(**sampling_args(node), generator=_gen(0))
    assert (sampler.top_p, sampler.top_k, sampler.win_size, sampler.tau_r) == (0.8, 25, 10, 0.1)
    with pytest.raises(ConfigError, match="temperature"):
        sampling_args(Node("name", node.target, {"temperature": 2.0}))
    with pytest.raises(ConfigError, match="random_sampling"):
        sampling_args(Node("name", "cosyvoice.utils.common.random_sampling", {}))
    with pytest.raises(ConfigError, match="top_k"):
        sampling_args(Node("name", node.target, {"top_k": 0}))
