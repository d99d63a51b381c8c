"""Kernel launches without Triton's per-call argument binding.

``kernel[grid](*args)`` binds and specialises every argument on each call (dtype, 16-byte
alignment of each pointer, each integer's divisibility by 16 and whether it is 1), builds the
cache key from that and looks the compiled kernel up: 25-40 us of host time per launch on an
H100 host, a third of a short forward. ``launch_kernel`` keys its own cache more finely than
Triton specialises (the kernel, the tensors' dtypes and 16-byte alignment, the exact scalar
values, the constexprs and options, the device): the first call of a key goes through Triton
and keeps the compiled kernel it returns, later calls hand the arguments straight to its
launcher.

A ``Launch`` is one launch made once per call geometry (``prepared``): it keeps its compiled
kernel per pointer alignment itself, so a call skips even that key, and hands the pointers over as
integers (the launcher then makes no driver query per pointer).

The direct call follows the convention of the Triton versions in ``_DIRECT_VERSIONS`` (the
launcher takes every parameter, constexprs included, in signature order); other versions, the
interpreter and runs with launch hooks (profilers) take Triton's own path, and so does every
launch after a launcher refuses the arguments (with a warning).
"""

from __future__ import annotations

import warnings

import torch

try:
    import triton
    from triton import knobs
except ImportError:  # no Triton, or one without knobs: Triton's own path (or no kernels at all)
    triton = knobs = None

try:  # the stream Triton launches on
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:
    def _raw_stream(device: int) -> int:
        return torch.cuda.current_stream(device).cuda_stream

_DIRECT_VERSIONS = ((3, 6),)
_DIRECT = knobs is not None and tuple(int(x) for x in triton.__version__.split(".")[:2]) in _DIRECT_VERSIONS
_MAX_ENTRIES = 4096  # distinct (shape, pointer alignment, config) keys kept; cleared when exceeded
_COMPILED: dict = {}


def launch_kernel(kernel, grid: tuple, tensors: tuple, scalars: tuple, **meta):
    """``kernel[grid](*tensors, *scalars, **meta)``. tensors: the kernel's leading pointer
    arguments; scalars: its numbers after them; meta: constexprs by name, num_warps, num_stages.
    The kernel's remaining parameters must all be constexprs. Returns the compiled kernel's entry
    where later launches of this key can go direct (``Launch``), else None."""
    if not _DIRECT or not tensors[0].is_cuda or _hooks_set():
        kernel[grid](*tensors, *scalars, **meta)
        return None
    ptrs, device = [t.data_ptr() for t in tensors], torch.cuda.current_device()
    key = (id(kernel), device, scalars, tuple(meta.items()), _layout(tensors, ptrs))
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel[grid](*tensors, *scalars, **meta)
        if len(_COMPILED) >= _MAX_ENTRIES:
            _COMPILED.clear()
        entry = _COMPILED[key] = _entry(kernel, compiled, len(tensors) + len(scalars), meta)
        return entry
    if _run(entry, grid, ptrs, scalars, device):
        return entry
    kernel[grid](*tensors, *scalars, **meta)
    return None


class Launch:
    """One launch made once (``prepared``): ``kernel[grid](*tensors, *scalars, **meta)`` for each call's
    tensors. Once ``launch_kernel`` has compiled it for a call's pointer alignment, dtypes and device,
    later calls with the same go straight to the compiled kernel's launcher."""

    __slots__ = ("kernel", "grid", "scalars", "meta", "_direct")

    def __init__(self, kernel, grid: tuple, scalars: tuple, meta: dict):
        self.kernel, self.grid, self.scalars, self.meta = kernel, tuple(grid), tuple(scalars), meta
        self._direct = {}

    def __call__(self, tensors: tuple) -> None:
        ptrs, device = [t.data_ptr() for t in tensors], torch.cuda.current_device() if tensors[0].is_cuda else None
        key = (device, _layout(tensors, ptrs))
        entry = self._direct.get(key) if device is not None and _DIRECT and not _hooks_set() else None
        if entry is None or not _run(entry, self.grid, ptrs, self.scalars, device):
            entry = launch_kernel(self.kernel, self.grid, tensors, self.scalars, **self.meta)
            if entry is not None:
                self._direct[key] = entry


def _layout(tensors: tuple, ptrs: list) -> tuple:
    """What Triton specialises a kernel on for its pointer arguments: dtypes, 16-byte alignment."""
    return tuple([(t.dtype, p & 15 == 0) for t, p in zip(tensors, ptrs)])


def _run(entry, grid: tuple, ptrs: list, scalars: tuple, device: int) -> bool:
    """Launch through the compiled kernel's own launcher on the current stream, the pointers as integers;
    False (direct launches off from now on) where the launcher refuses the arguments."""
    run, function, packed, tail, _ = entry
    try:
        run(*grid, *(1,) * (3 - len(grid)), _raw_stream(device), function, packed, None, None, None, *ptrs, *scalars,
            *tail)
    except TypeError as e:  # the launcher parses its arguments before launching anything
        _give_up(e)
        return False
    return True


def chained(meta: dict, i: int, chain: bool, after: bool = False) -> dict:
    """The constexprs of a call's launch i where its launches chain (``chain``: sm_90 and a Triton with grid
    dependency control): every launch runs its kernel's ``CHAIN`` form; the first waits for what came before
    it on the stream (after: it too starts while the launch before it runs, one that signals its dependents in
    its own ``CHAIN`` form), each later one starts while the one before runs (``launch_pdl``) and waits
    in-kernel up to where it reads what that one writes. Without ``chain``: ``meta`` as it is."""
    return dict(meta, CHAIN=True, launch_pdl=i > 0 or after) if chain else meta


_PREPARED: dict = {}  # launches per call geometry (``prepared``)


def prepared(key: tuple, build):
    """``build()``, made once per ``key`` (a call's geometry: plan, shapes, strides, dtype, device, flags)
    and kept: a call's launches (grids, scalars, constexprs, configs) are then looked up, not rebuilt.
    Cleared when ``_MAX_ENTRIES`` keys are held. Not kept when built while a CUDA graph captures (configs
    are then taken untimed, ``triton_fused.pick``)."""
    value = _PREPARED.get(key)
    if value is None:
        value = build()
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return value
        if len(_PREPARED) >= _MAX_ENTRIES:
            _PREPARED.clear()
        _PREPARED[key] = value
    return value


def _give_up(error: Exception) -> None:
    """A Triton whose launcher takes other arguments than ``_DIRECT_VERSIONS``' (a patch release):
    every later launch goes through ``kernel[grid]``."""
    global _DIRECT
    _DIRECT = False
    warnings.warn(f"Triton {triton.__version__}'s kernel launcher refused direct arguments ({error}); "
                  "kernels launch through kernel[grid] from now on", RuntimeWarning, stacklevel=3)


def _hooks_set() -> bool:
    """A launch hook is set (a profiler's: it wants Triton's launch metadata). Triton 3.6 keeps them
    in chains, empty when none is set."""
    return any(hook is not None and bool(getattr(hook, "calls", True))
               for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


def _entry(kernel, compiled, positional: int, meta: dict):
    """(launcher, function handle, packed metadata, constexpr values in signature order, the kernel:
    kept so that the id in the key stays its own) of a kernel Triton compiled and launched once."""
    rest = kernel.params[positional:]
    if not all(p.is_constexpr for p in rest):
        raise TypeError(f"{kernel.__name__}: the parameters after the positional ones must be constexprs")
    tail = tuple(meta[p.name] if p.name in meta else p.default for p in rest)
    return compiled.run, compiled.function, compiled.packed_metadata, tail, kernel
