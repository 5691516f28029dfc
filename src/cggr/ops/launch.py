"""Launching Triton kernels for less host time than ``kernel[grid](...)``.

``kernel[grid](...)`` binds and specialises every argument in Python on each call, and Triton
3.6 then builds launch metadata and calls its (empty) launch hooks: about 20 µs of host time a
launch, more than the GPU spends on a small batch. :func:`launch` keeps each compiled kernel
under a key holding everything Triton specialises on here (each tensor's dtype and 16-byte
alignment; each integer's equality to 1, divisibility by 16 and 32-bit range; the
constexprs, ``num_warps``, ``maxnreg`` and the device) and later calls its compiled launcher
directly, the way torch.compile's generated code does, skipping the hooks while none is
installed (a profiler that installs one sees every launch). The first call of a key, the
interpreter and untested Triton versions take the ordinary path.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import triton
from triton import knobs
from triton.runtime import driver

# The compiled launcher's signature is internal to Triton: only use it where it was tested.
_DIRECT = triton.__version__.split(".")[:2] == ["3", "6"]
_compiled: Dict[tuple, Any] = {}
_Tensor = torch.Tensor


class _Launcher:
    """A compiled kernel and what calling its launcher needs besides the arguments."""

    def __init__(self, compiled, n_args: int, constexprs: dict, kernel):
        self.compiled = compiled
        run = compiled.run
        # The C launch function itself where Triton's wrapper would only allocate nothing.
        self.bare = (run.launch if getattr(run, "global_scratch_size", 1) == 0
                     and getattr(run, "profile_scratch_size", 1) == 0 else None)
        self.head = (compiled.function, getattr(run, "launch_cooperative_grid", False),
                     getattr(run, "launch_pdl", False), None, None, compiled.packed_metadata, None, None, None)
        # Every parameter in declaration order; the launcher skips the constexpr ones.
        self.tail = tuple(constexprs[name] for name in kernel.arg_names[n_args:])


def _key(kernel, device, num_warps, maxnreg, constexprs: dict, specialisations) -> tuple:
    return (kernel, device, num_warps, maxnreg, *constexprs.items(), *specialisations)


def _hooked() -> bool:
    """Whether a launch hook is installed (Triton 3.6's hooks are chains, empty by default)."""
    enter_hook, exit_hook = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return ((enter_hook is not None and bool(getattr(enter_hook, "calls", True)))
            or (exit_hook is not None and bool(getattr(exit_hook, "calls", True))))


def _specialisations(args) -> list:
    return [(a.dtype, a.data_ptr() % 16 == 0) if type(a) is _Tensor
            else (a == 1, a % 16 == 0, -2147483648 <= a < 2147483648) if type(a) is int
            else float if type(a) is float else a  # bool, None, a dtype: by value
            for a in args]


def launch(kernel, grid: int, *args, num_warps: Optional[int] = None, maxnreg: Optional[int] = None,
           **constexprs) -> None:
    """``kernel[(grid,)](*args, **constexprs, num_warps=num_warps, maxnreg=maxnreg)`` on the current
    device and stream. ``args`` are the kernel's runtime arguments in order; ``constexprs`` name
    every constexpr parameter (they follow the runtime ones in each kernel here)."""
    options = {} if num_warps is None else {"num_warps": num_warps}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    if not _DIRECT or not isinstance(kernel, triton.runtime.JITFunction):  # the interpreter
        kernel[(grid,)](*args, **constexprs, **options)
        return
    device = torch.cuda.current_device()
    key = _key(kernel, device, num_warps, maxnreg, constexprs, _specialisations(args))
    launcher = _compiled.get(key)
    if launcher is None:
        _compiled[key] = _Launcher(kernel[(grid,)](*args, **constexprs, **options), len(args), constexprs, kernel)
        return
    stream = driver.active.get_current_stream(device)
    compiled = launcher.compiled
    if launcher.bare is None or _hooked():
        params = (*args, *launcher.tail)
        compiled.run(grid, 1, 1, stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata((grid, 1, 1), stream, *params), knobs.runtime.launch_enter_hook,
                     knobs.runtime.launch_exit_hook, *params)
        return
    launcher.bare(grid, 1, 1, stream, *launcher.head, *args, *launcher.tail)


def prepared(kernel, grid: int, args: tuple, late: int, late_dtype: torch.dtype, *, num_warps: Optional[int] = None,
             **constexprs):
    """``launch`` of ``args`` with ``args[late]`` given later: returns ``run(value)``, which
    launches with the tensor ``value`` in that place. The host work that does not depend on
    ``value`` is done here, for a ``value`` of ``late_dtype`` with a 16-byte aligned pointer (a
    fresh allocation); ``run`` takes the ordinary path for any other, or while a launch hook is
    installed. For a launch from a thread where Python runs slowly (autograd's device thread,
    for a backward)."""
    def ordinary(value):
        launch(kernel, grid, *args[:late], value, *args[late + 1:], num_warps=num_warps, **constexprs)

    if not _DIRECT or not isinstance(kernel, triton.runtime.JITFunction):  # the interpreter
        return ordinary
    device = torch.cuda.current_device()
    specialisations = _specialisations(args[:late]) + [(late_dtype, True)] + _specialisations(args[late + 1:])
    launcher = _compiled.get(_key(kernel, device, num_warps, None, constexprs, specialisations))
    if launcher is None or launcher.bare is None:  # not compiled yet (it is by the first launch), or not bare
        return ordinary
    before = tuple(a.data_ptr() if type(a) is _Tensor else a for a in args[:late])  # the launcher takes ints
    after = tuple(a.data_ptr() if type(a) is _Tensor else a for a in args[late + 1:])

    def run(value):
        if value.dtype != late_dtype or value.data_ptr() % 16 or torch.cuda.current_device() != device or _hooked():
            with torch.cuda.device(device):
                ordinary(value)
            return
        launcher.bare(grid, 1, 1, driver.active.get_current_stream(device), *launcher.head, *before, value, *after,
                      *launcher.tail)

    return run
