"""Stage schedule: doubling layer counts, round splitting and validation (devft_paper.md §1)."""

import pytest

from devft.core.schedule import (
    Stage,
    build_schedule,
    doubling_stages,
    full_model_schedule,
    split_rounds,
)
from devft.errors import ConfigError


@pytest.mark.parametrize(
    ("num_layers", "num_stages", "expected"),
    [
        (32, 4, [4, 8, 16, 32]),  # the paper's 32-layer schedule
        (30, 4, [4, 8, 15, 30]),  # SmolLM2-135M: ceil(30/8)=4, ceil(30/4)=8, ceil(30/2)=15
        (40, 4, [5, 10, 20, 40]),  # LLaMA2-13B reading in devft_paper.md §1
        (24, 3, [6, 12, 24]),
        (10, 1, [10]),
        (4, 4, [1, 2, 4]),  # ceil(4/8)=1 and ceil(4/4)=1 collapse
        (3, 4, [1, 2, 3]),  # 1, 1, 2, 3
        (2, 4, [1, 2]),  # 1, 1, 1, 2
        (1, 4, [1]),
    ],
)
def test_doubling_stages(num_layers, num_stages, expected):
    assert doubling_stages(num_layers, num_stages) == expected


def test_doubling_stages_is_always_a_valid_schedule():
    for num_layers in range(1, 65):
        for num_stages in [1, 2, 3, 4, 6]:
            counts = doubling_stages(num_layers, num_stages)
            assert counts[-1] == num_layers, (num_layers, num_stages)
            assert counts[0] >= 1
            assert all(b > a for a, b in zip(counts, counts[1:])), counts
            assert len(counts) <= num_stages
            # and build_schedule accepts it as is
            assert [
                s.num_layers for s in build_schedule(num_layers, [], num_stages, [1], 1)
            ] == counts


@pytest.mark.parametrize(
    ("total", "stages", "expected"),
    [
        (12, 4, [3, 3, 3, 3]),
        (10, 4, [2, 2, 3, 3]),
        (7, 3, [2, 2, 3]),
        (4, 4, [1, 1, 1, 1]),
        (5, 1, [5]),
    ],
)
def test_split_rounds(total, stages, expected):
    rounds = split_rounds(total, stages)
    assert rounds == expected
    assert sum(rounds) == total


def test_split_rounds_needs_one_round_per_stage():
    with pytest.raises(ConfigError) as info:
        split_rounds(3, 4)
    assert info.value.field == "federation.rounds"
    assert info.value.value == 3
    assert "federation.rounds" in str(info.value)


def test_build_schedule_default_doubling_and_even_rounds():
    schedule = build_schedule(30, [], 4, [], 12)
    assert schedule == [Stage(0, 4, 3), Stage(1, 8, 3), Stage(2, 15, 3), Stage(3, 30, 3)]


def test_build_schedule_explicit_stages_and_rounds():
    assert build_schedule(8, [2, 4, 8], 4, [1, 2, 5], 99) == [
        Stage(0, 2, 1),
        Stage(1, 4, 2),
        Stage(2, 8, 5),
    ]


def test_build_schedule_single_rounds_value_applies_to_every_stage():
    assert [s.rounds for s in build_schedule(32, [], 4, [6], 1)] == [6, 6, 6, 6]


def test_build_schedule_uneven_split_goes_to_last_stages():
    assert [s.rounds for s in build_schedule(16, [4, 8, 16], 4, [], 11)] == [3, 4, 4]


def test_full_model_schedule():
    assert full_model_schedule(30, 12) == [Stage(0, 30, 12)]


@pytest.mark.parametrize(
    ("num_layers", "stages", "rounds_per_stage", "total", "field"),
    [
        (8, [4, 4, 8], [], 12, "devft.stages"),  # not strictly increasing
        (8, [8, 4], [], 12, "devft.stages"),  # decreasing, ends below depth
        (8, [2, 4], [], 12, "devft.stages"),  # does not end at the depth
        (8, [0, 8], [], 12, "devft.stages"),  # a stage without layers
        (8, [4, 16], [], 12, "devft.stages"),  # more groups than layers
        (8, [2, 4, 8], [3, 3], 12, "devft.rounds_per_stage"),  # wrong length
        (8, [2, 4, 8], [3, 3, 3, 3], 12, "devft.rounds_per_stage"),
        (8, [2, 4, 8], [], 2, "federation.rounds"),  # fewer rounds than stages
    ],
)
def test_build_schedule_errors_name_the_field(num_layers, stages, rounds_per_stage, total, field):
    with pytest.raises(ConfigError) as info:
        build_schedule(num_layers, stages, 4, rounds_per_stage, total)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field} = ")


def test_build_schedule_more_groups_than_layers_message():
    with pytest.raises(ConfigError) as info:
        build_schedule(8, [4, 16], 4, [], 12)
    message = str(info.value)
    assert "[4, 16]" in message and "8" in message and "more groups than layers" in message


def test_build_schedule_not_ending_at_depth_message_names_depth():
    with pytest.raises(ConfigError) as info:
        build_schedule(12, [3, 6], 4, [], 12)
    assert "ending at the model's depth (12)" in str(info.value)


def test_build_schedule_zero_stages_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        build_schedule(8, [], 0, [], 12)
    assert info.value.field == "devft.num_stages"
