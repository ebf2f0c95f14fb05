"""Shared helpers for the kernel tests: interpret modes and the TPU lowering check."""

from __future__ import annotations

import jax
import pytest
from jax.experimental.pallas import tpu as pltpu

INTERPRET_MODES = [pytest.param(True, id="interpret"), pytest.param("tpu", id="tpu-interpret")]


def interpret_arg(mode):
    return pltpu.InterpretParams() if mode == "tpu" else mode


def lowers_for_tpu(fn, *args) -> None:
    """Mosaic TPU lowering on CPU: rejects ops (sort, scatter, ...) that interpret mode accepts."""
    jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
