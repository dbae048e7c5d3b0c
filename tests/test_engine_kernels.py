"""The kernels' array helpers: views made inside compiled code without numba's reshape helper or reference counts."""

import numba
import numpy as np
import pytest

from jpq_core.engine import kernels


@numba.njit
def _write_through_flat(array, index, value):
    flat = kernels._flat(array)
    flat[index] = value
    return flat.shape[0]


@pytest.mark.parametrize("shape", [(7,), (2, 3), (2, 1, 3, 4, 5)])
def test_a_flat_view_is_the_array_in_c_order_and_writes_through(shape):
    array = np.zeros(shape, np.uint8)
    last = array.size - 1
    assert _write_through_flat(array, last, 9) == array.size
    assert array.reshape(-1)[last] == 9 and array.sum() == 9  # the same memory, the same order as reshape(-1)


def test_a_flat_view_of_a_non_contiguous_array_does_not_compile():
    with pytest.raises(numba.core.errors.TypingError):
        _write_through_flat(np.zeros((4, 4), np.uint8)[:, ::2], 0, 1)
