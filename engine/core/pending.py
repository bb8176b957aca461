"""Step results still on their way from the device.

A kind's ``run`` may return a ``Pending`` instead of its output: the loop then hands the step back
(``finish``) once ``ready()``, and meanwhile plans and launches the next step (engine/core/loop.py).
``Readback`` is the one the kinds use: the step's result tensors are copied into pinned host memory
without blocking and a CUDA event is recorded after the copies; the step is done when the event is.
On CPU the tensors are already on the host: it is ready at once and the loop runs as a plain loop.
"""
from typing import Callable, List, Optional, Sequence

import torch


class Pending:
    """The output of a step whose device work may still be running."""

    def ready(self) -> bool:
        """True once ``result()`` would not wait."""
        raise NotImplementedError

    def result(self):
        """The step's output (what its kind's ``finish`` takes), waiting for the device if need be."""
        raise NotImplementedError


class Readback(Pending):
    """``tensors`` (device tensors, or None) on their way to the host; ``result()`` is
    ``convert(host tensors)`` once they are there."""

    def __init__(self, tensors: Sequence[Optional[torch.Tensor]], convert: Callable[[List], object]):
        self._convert = convert
        self._event = None
        host: List[Optional[torch.Tensor]] = []
        for t in tensors:
            if t is not None and t.device.type == "cuda":
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buf.copy_(t, non_blocking=True)
                t = buf
            elif t is not None:
                t = t.cpu()  # another device type: a plain (blocking) copy
            host.append(t)
        if any(t is not None and t.device.type == "cuda" for t in tensors):
            self._event = torch.cuda.Event()
            self._event.record()  # on the current stream, after the copies
        self._host = host

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def result(self):
        if self._event is not None:
            self._event.synchronize()
        return self._convert(self._host)


def resolve(out):
    """A step's output, waiting for it if it is still pending."""
    return out.result() if isinstance(out, Pending) else out
