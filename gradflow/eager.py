"""Hook bodies that run eagerly, on real tensors, also inside ``torch.compile``: what
``torch.compiler.disable`` does, without its wrapper's cost where nothing is compiled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

# Dynamo's frame callback: None while nothing compiled is running (private, hence looked
# up; without it every call goes through torch.compiler.disable).
_frame_callback: Callable[[], Any] | None = getattr(
    getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None), "get_eval_frame_callback", None
)


def eager(fn: F) -> F:
    """``fn`` as ``torch.compiler.disable(fn)``: Dynamo never traces it (a graph break where
    a traced hook calls it) nor compiles its frames. Where no compiled code is running it
    calls ``fn`` directly: the wrapper costs ~1-4 us a call, and hooks run hundreds of
    times a step.

    Args:
        fn: a function or method.

    Returns:
        A function calling ``fn`` with the same arguments.
    """
    disabled = torch.compiler.disable(fn)
    callback = _frame_callback
    if callback is None:
        return disabled

    def call(*args: Any, **kwargs: Any) -> Any:
        # Tracing, is_compiling() is True (a constant to Dynamo); running compiled code that
        # left a frame to eager Python, the frame callback is set.
        if torch.compiler.is_compiling() or callback() is not None:
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return call  # type: ignore[return-value]
