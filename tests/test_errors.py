"""errors.checked_int: the one check of count-like parameters."""

import numpy as np
import pytest

from pathanat.errors import ConfigError, PathanatError, checked_int


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.uint8(2)])
def test_integers_at_or_above_the_minimum_come_back_as_int(value):
    out = checked_int(value, "n")
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [0, -3, True, 2.0, "3", None, np.float32(4)])
def test_anything_else_is_refused_with_the_name_what_was_expected_and_what_came(value):
    with pytest.raises(PathanatError) as caught:
        checked_int(value, "n")
    assert str(caught.value) == f"n: expected an integer >= 1, got {value!r}"


def test_the_minimum_the_hint_and_the_error_class_are_the_caller_s():
    assert checked_int(0, "cells", minimum=0) == 0
    expected = r"^dims: expected an integer >= 2 \(mixture coordinates\), got 1$"
    with pytest.raises(ConfigError, match=expected):
        checked_int(1, "dims", minimum=2, what="mixture coordinates", error=ConfigError)
