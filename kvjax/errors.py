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


class InputError(KvjaxError, ValueError):
    """A public function got an argument it cannot use."""


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def bad_input(argument: str, value, allowed: str) -> InputError:
    """`InputError("temperature=nan: allowed: a finite number >= 0")`-style error."""
    return InputError(f"{argument}={_show(value)}: {allowed}")
