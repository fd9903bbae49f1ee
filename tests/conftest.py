"""Unit tests run in float64: references are compared to 1e-5 relative or tighter."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def key():
    return jax.random.key(0)
