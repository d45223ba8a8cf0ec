"""Programmatic dependent launch (PDL) for the decode step's chain of kernels.

A decode step in one layer is six kernels back to back (scores, select, union, expansion,
split attention, combine), each reading what the one before wrote. Launched plainly, a kernel's
programs are scheduled only after the previous kernel has finished; under PDL (Hopper and later)
they are scheduled while it drains and wait on the device (`griddepcontrol.wait`) until its writes
are visible. On the H200 a chain of six small kernels replayed as a CUDA graph took 5.7 against
7.9 us (benchmarks/results/kernels/NOTES.md, round 23).

Every kernel launched with PDL calls `wait_for_previous` before anything else: it reads no input
and writes no output before the kernel before it is complete, and it completes only after that,
so each kernel is also ordered after every earlier one, PDL or not. Kernels launched plainly
(torch's, the prefill's) keep the stream's usual order. `GSA_RAG_PDL=0` launches every kernel plainly.
"""

from __future__ import annotations

import contextlib
import os
from functools import cache

import torch

from gsa_rag.kernels.dispatch import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton before PDL (3.3 and older): plain launches, the same kernels
    gdc_wait = gdc_launch_dependents = None

# GSA_RAG_PDL=0 launches every kernel plainly (a driver that mishandles PDL, or a comparison);
# benchmarks switch it off within `plain_launches` to time the plain launches beside
ENABLED = os.environ.get("GSA_RAG_PDL", "1").strip().lower() not in ("0", "false", "off", "no")


@cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_launch(device: torch.device, allow: bool = True) -> dict:
    """Keyword arguments for a kernel launch on `device`: the kernel's `PDL` constexpr, and
    Triton's `launch_pdl` option where PDL runs (`allow`, an NVIDIA GPU of compute capability 9.0
    and up, a Triton that has it, ENABLED; never under the interpreter, which has no
    `griddepcontrol`, nor on ROCm, whose devices also say "cuda").

    allow=False launches plainly: an early launch places a kernel's programs on whatever SMs the
    previous kernel has left free, which costs a grid that needs them spread evenly over every SM
    (the int8 scores kernel's one wave; a combine with more programs than SMs after the attention's
    last, part-full wave: NOTES.md round 23)."""
    on = (allow and ENABLED and gdc_wait is not None and device.type == "cuda" and torch.version.hip is None
          and not interpreting()
          and _capable(device.index if device.index is not None else torch.cuda.current_device()))
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@contextlib.contextmanager
def plain_launches():
    """Within: every launch is plain (ENABLED off), as before PDL; for benchmarks that time both
    ways in one run. Kernels are compiled per PDL setting, so nothing is recompiled on return."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before


if triton is not None and gdc_wait is not None:

    @triton.jit
    def wait_for_previous(PDL: tl.constexpr):
        # first thing in a kernel launched with PDL: wait until the previous kernel is complete and
        # its writes visible, then let the next kernel's programs be scheduled (they wait likewise)
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

elif triton is not None:

    @triton.jit
    def wait_for_previous(PDL: tl.constexpr):
        pass
