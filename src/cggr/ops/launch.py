"""Launching Triton kernels for less host time than ``kernel[grid](...)``.

``kernel[grid](...)`` binds and specialises every argument in Python on each call: about
20 µs of host time a launch, more than the GPU spends on a small batch. :func:`launch` keeps
each compiled kernel under a key holding everything Triton specialises on here (each tensor's
dtype and 16-byte alignment; each integer's equality to 1, divisibility by 16 and 32-bit range;
the constexprs, ``num_warps``, ``maxnreg`` and the device) and later calls its launcher
directly, the way torch.compile's generated code does. The first call of a key, the interpreter and untested
Triton versions take the ordinary path.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import triton
from triton import knobs
from triton.runtime import driver

# CompiledKernel.run's signature is internal to Triton: only use it where it was tested.
_DIRECT = triton.__version__.split(".")[:2] == ["3", "6"]
_INT32 = (-(1 << 31), 1 << 31)
_compiled: Dict[tuple, Any] = {}


def _specialisation(arg):
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if type(arg) is int:
        return arg == 1, arg % 16 == 0, _INT32[0] <= arg < _INT32[1]
    if type(arg) is float:
        return float
    return arg  # bool, None, a dtype: by value


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
    device = driver.active.get_current_device()
    key = (kernel, device, num_warps, maxnreg, *constexprs.items(), *map(_specialisation, args))
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = kernel[(grid,)](*args, **constexprs, **options)
        return
    # Every parameter in declaration order; the launcher skips the constexpr ones.
    params = (*args, *(constexprs[name] for name in kernel.arg_names[len(args):]))
    stream = driver.active.get_current_stream(device)
    compiled.run(grid, 1, 1, stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata((grid, 1, 1), stream, *params),
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *params)
