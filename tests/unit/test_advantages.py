import itertools
import math

import pytest
import torch

from keel.errors import KeelError
from keel.evaluate import pass_at_k
from keel.rl.advantages import group_advantages, groups_with_signal, overlong_penalty


def test_grpo_advantages_hand_values_with_bessel_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 0.0])
    adv = group_advantages(rewards, group_size=3)
    # group 0: mean 1/3; deviations 2/3, -1/3, -1/3; Bessel var = (4/9 + 1/9 + 1/9) / 2 = 1/3
    std0 = math.sqrt(1 / 3)
    # group 1: mean 2/3; deviations -2/3, 4/3, -2/3; Bessel var = (4/9 + 16/9 + 4/9) / 2 = 4/3
    std1 = math.sqrt(4 / 3)
    expected = [
        (2 / 3) / (std0 + 1e-4), (-1 / 3) / (std0 + 1e-4), (-1 / 3) / (std0 + 1e-4),
        (-2 / 3) / (std1 + 1e-4), (4 / 3) / (std1 + 1e-4), (-2 / 3) / (std1 + 1e-4),
    ]  # fmt: skip
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_grpo_advantages_two_samples_use_sample_std():
    # {0, 1}: mean 0.5, Bessel std = sqrt((0.25 + 0.25) / 1) = 0.7071 (population std would be 0.5)
    adv = group_advantages(torch.tensor([0.0, 1.0]), group_size=2, eps=0.0)
    assert adv.tolist() == pytest.approx([-0.5 / math.sqrt(0.5), 0.5 / math.sqrt(0.5)], rel=1e-6)


def test_dr_grpo_advantages_are_mean_centred_only():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 0.0])
    adv = group_advantages(rewards, group_size=3, scale_by_std=False)
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2 / 3, 4 / 3, -2 / 3], rel=1e-6)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_all_equal_group_gives_zero_advantage(scale_by_std):
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, group_size=3, scale_by_std=scale_by_std)
    assert adv[:6].tolist() == [0.0] * 6
    assert adv[6:].abs().min().item() > 0.1


def test_groups_with_signal():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.0, 1.0, 1.0])
    assert groups_with_signal(rewards, group_size=2).tolist() == [False, False, True, False]
    # the same rewards in groups of 4: [1, 1, 0, 0] and [0.5, 0, 1, 1] both carry signal
    assert groups_with_signal(rewards, group_size=4).tolist() == [True, True]
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    assert groups_with_signal(rewards, group_size=4).tolist() == [False, True]


@pytest.mark.parametrize("group_size", [1, 0])
def test_group_size_below_two_is_a_user_error(group_size):
    with pytest.raises(KeelError, match="group size must be >= 2"):
        group_advantages(torch.tensor([1.0, 0.0]), group_size=group_size)
    with pytest.raises(KeelError, match="group size must be >= 2"):
        groups_with_signal(torch.tensor([1.0, 0.0]), group_size=group_size)


def test_overlong_penalty_three_regimes_and_boundaries():
    # max_len 20, cache 4: free up to 16, linear ramp over (16, 20], -1 beyond
    lengths = torch.tensor([0, 10, 16, 17, 18, 19, 20, 21, 100])
    penalty = overlong_penalty(lengths, max_len=20, cache_len=4)
    expected = [
        0.0, 0.0,
        0.0,              # L == max_len - cache_len: still free
        (16 - 17) / 4,    # -0.25
        (16 - 18) / 4,    # -0.5
        (16 - 19) / 4,    # -0.75
        (16 - 20) / 4,    # L == max_len: -1, the ramp meets the hard penalty
        -1.0, -1.0,
    ]  # fmt: skip
    assert penalty.tolist() == pytest.approx(expected)


def test_overlong_penalty_rejects_bad_cache():
    with pytest.raises(KeelError, match="cache length"):
        overlong_penalty(torch.tensor([1]), max_len=10, cache_len=0)
    with pytest.raises(KeelError, match="cache length"):
        overlong_penalty(torch.tensor([1]), max_len=10, cache_len=11)


def _pass_at_k_brute(n, c, k):
    """Fraction of k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_hand_values_and_large_n():
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # only 4 wrong samples: every 5-subset has a correct one
    # large n: product form stays finite where C(1000, 500) would overflow a float
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert pass_at_k(1000, 1, 1) == pytest.approx(1 / 1000)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(KeelError, match="k <= n"):
        pass_at_k(4, 1, 5)
