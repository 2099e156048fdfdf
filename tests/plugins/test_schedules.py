"""Schedules: wsd's warmup, stable phase and each cool-down shape at the steps that pin them."""

import math

import pytest
from pydantic import ValidationError

from hybridlab.plugins.schedule.wsd import WSD, WSDConfig


def wsd(steps=100, **fields):
    return WSD(WSDConfig(**fields), steps)


# steps 100, decay_steps 21: the cool-down runs over steps 79..99, p = (step - 79) / 20,
# so step 89 is its midpoint (p = 0.5) and step 99 its end (p = 1)
@pytest.mark.parametrize("shape, midpoint", [
    ("linear", 0.1 + 0.9 * 0.5),
    ("cosine", 0.1 + 0.9 * 0.5),
    ("1-sqrt", 0.1 + 0.9 * (1 - math.sqrt(0.5))),
    ("exponential", 0.1 ** 0.5),
])
def test_wsd_values_at_key_steps(shape, midpoint):
    s = wsd(warmup=10, decay_steps=21, shape=shape, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1)  # warmup: (step + 1) / warmup
    assert s(4) == pytest.approx(0.5)
    assert s(9) == 1.0 and s(10) == 1.0 and s(50) == 1.0 and s(79) == 1.0
    assert s(89) == pytest.approx(midpoint)
    assert s(99) == pytest.approx(0.1)
    values = [s(i) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never rises after the warmup


def test_wsd_quarter_point_tells_the_shapes_apart():
    # p = 0.25 at step 84: linear 0.75, cosine (1 + cos(pi/4)) / 2, 1-sqrt 0.5
    values = {shape: wsd(decay_steps=21, shape=shape)(84) for shape in ("linear", "cosine", "1-sqrt")}
    assert values == pytest.approx({"linear": 0.75, "cosine": (1 + math.cos(math.pi / 4)) / 2, "1-sqrt": 0.5})


def test_wsd_decay_fraction_and_a_cool_down_longer_than_the_run():
    s = wsd(steps=50, decay=0.2, shape="linear")  # round(0.2 * 50) = 10 steps: 40..49
    assert s(39) == 1.0 and s(40) == 1.0 and s(49) == 0.0
    assert s(44) == pytest.approx(1 - 4 / 9)
    short = wsd(steps=10, warmup=4, decay_steps=50, shape="linear")  # starts when the warmup ends
    assert short(3) == 1.0 and short(4) == 1.0 and short(9) == 0.0


def test_wsd_config_errors():
    with pytest.raises(ValidationError, match="min_ratio, which must then be above 0"):
        WSDConfig(shape="exponential")
    with pytest.raises(ValidationError):
        WSDConfig(shape="sqrt")
    with pytest.raises(ValidationError):
        WSDConfig(decay=0)


@pytest.mark.parametrize("steps, config", [
    (10, {"decay_steps": 1, "shape": "linear", "min_ratio": 0.1}),
    (5, {"shape": "1-sqrt", "min_ratio": 0.1}),  # decay 0.2 of 5 steps: one cool-down step
    (4, {"warmup": 3, "decay": 0.5, "shape": "cosine", "min_ratio": 0.1}),  # the warmup leaves one step
])
def test_a_one_step_cool_down_is_the_last_step_at_min_ratio(steps, config):
    """Found probing: with one cool-down step, p was 0 and the last step kept 1."""
    schedule = WSD(WSDConfig(**config), steps)
    assert schedule(steps - 1) == pytest.approx(0.1)
    assert schedule(steps - 2) == pytest.approx(1.0)
