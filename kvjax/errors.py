"""kvjax's error types. Every error kvjax raises on purpose is a `KvjaxError`; the message names the
argument, the value given and what is allowed.

    KvjaxError
      InputError      a bad argument to a public function (also a ValueError)
      PolicyError     a policy built with a bad option, or unfit for the model (kvjax.policies)
      ConfigError     a checkpoint's config.json (kvjax.models)
      CheckpointError a checkpoint's files (kvjax.io)
      ProfileError    an XKV budget profile (kvjax.xkv)
"""

from __future__ import annotations


class KvjaxError(Exception):
    """Base of every error kvjax raises on purpose."""


class InputError(KvjaxError, ValueError, TypeError):
    """A public function got an argument it cannot use (a wrong value or a wrong type: it is both a
    ValueError and a TypeError, so either `except` catches it)."""


def _show(value) -> str:
    text = repr(value)
    if len(text) <= 80:
        return text
    return text[:77] + "..." if isinstance(value, (str, bytes, list, tuple)) else f"a {type(value).__name__}"


def bad_input(argument: str, value, allowed: str) -> InputError:
    """`InputError("temperature must be a finite number >= 0, got nan")`: the argument, what is
    allowed (`allowed` completes "must be ..."), the value given."""
    return InputError(f"{argument} must be {allowed}, got {_show(value)}")
