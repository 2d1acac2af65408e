"""The memory budget: how much one command or API call may allocate for its own arrays.

Everything that can grow with an option or a model's declared sizes (IG steps, class chunks,
radius tangents, batch chunks) estimates its peak first and either runs in pieces that fit
:func:`memory_budget` or refuses with the estimate (:func:`check_fits`), so that a request is
never killed by the kernel.

The budget is, in order: what :func:`set_memory_budget` set (the CLI's ``--memory-budget``),
else the ``ONNX_PATHWISE_MEMORY_BUDGET`` environment variable, else
:data:`DEFAULT_FRACTION` of the memory available now (``MemAvailable``).

>>> parse_size("512M"), parse_size("1.5GiB"), parse_size("100000000")
(536870912, 1610612736, 100000000)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import platform
import re
import threading
from collections.abc import Iterator

from .errors import PathwiseError

ENV_VAR = "ONNX_PATHWISE_MEMORY_BUDGET"
#: Share of the memory available at start that a run may use by default.
DEFAULT_FRACTION = 0.5
#: Never plan with less than this, whatever the machine reports.
MIN_BUDGET = 64 * 2**20
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_override: int | None = None


class BudgetError(PathwiseError):
    """A request would need more memory than the budget allows (exit code 2, a usage error:
    ask for less, or raise the budget)."""


def parse_size(text: str | int) -> int:
    """Bytes from ``"4G"``, ``"512MiB"``, ``"1.5g"`` or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
        unit = ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGTkmgt]?)(?:i?[Bb])?\s*", str(text))
        if not m:
            raise PathwiseError(f"memory budget {text!r} is not a size such as 4G, 512M or 1000000")
        value, unit = float(m.group(1)), m.group(2).upper()
    nbytes = value * _UNITS[unit]
    if not math.isfinite(nbytes) or nbytes < MIN_BUDGET:
        raise PathwiseError(f"memory budget {text!r} is below the minimum of {MIN_BUDGET // 2**20} MiB")
    return int(nbytes)


def available_memory() -> int:
    """Bytes of memory available now (Linux ``MemAvailable``; elsewhere physical memory)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (OSError, ValueError, AttributeError):
        return 4 * 2**30


def set_memory_budget(size: str | int | None) -> None:
    """Set the budget for this process (``None``: back to the environment or the default)."""
    global _override
    _override = None if size is None else parse_size(size)


def memory_budget() -> int:
    """Bytes one call may allocate for its own arrays."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR)
    if env:
        return parse_size(env)
    return max(MIN_BUDGET, int(available_memory() * DEFAULT_FRACTION))


def format_bytes(n: float) -> str:
    """``1.5 GiB``-style text for messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_fits(estimate: float, what: str) -> None:
    """Refuse ``what`` with its estimate when it would not fit the memory budget."""
    budget = memory_budget()
    if not math.isfinite(estimate) or estimate > budget:
        raise BudgetError(
            f"{what} would need about {format_bytes(estimate)}, more than the memory budget of "
            f"{format_bytes(budget)} (set --memory-budget or {ENV_VAR} to allow more)"
        )


# ---------------------------------------------------------------------- the heap during sweeps

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
#: While a sweep runs, arrays up to this share of the memory budget come from malloc's heap
#: instead of fresh mappings (at most HEAP_MAX_ARRAY), and twice that stays free at the heap's
#: top for the next array: what the heap holds back stays small beside the budget.
HEAP_BUDGET_SHARE = 1 / 16
HEAP_MAX_ARRAY = 1 << 30
_GLIBC_DEFAULT = 128 * 1024  # both parameters' glibc default
#: What a block leaves behind: glibc's dynamic mmap threshold at its ceiling (4 MiB per byte of
#: a long: 32 MiB on 64-bit Linux) and twice that as the trim threshold, where a process that has
#: freed a large array stands anyway. The first mallopt call turns glibc's dynamic threshold off
#: for good, so putting back the 128 KiB default left every later array above it (the host
#: program's too) a fresh mapping, page-faulted anew: Captum's Integrated Gradients on
#: MobileNet-V2 in the same process went 2.05 → 2.97 s after one empty block, 1.96 → 3.47 s
#: after one explanation.
_GLIBC_DYNAMIC_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
_heap_users = 0
_heap_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _mallopt() -> object | None:
    """glibc's mallopt, or None on another C library or platform."""
    return getattr(_glibc(), "mallopt", None)


def release_freed() -> None:
    """Return the memory that freed arrays still hold to the system (glibc's ``malloc_trim``;
    nothing elsewhere)."""
    trim = getattr(_glibc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def release_freed_if_large() -> None:
    """:func:`release_freed` when the process holds more than half the memory budget (or when
    its size cannot be read); below that, freed memory stays for the next sweep to reuse.

    After a class-chunked sweep the heap holds gigabytes of freed arrays. Handed back, the next
    sweep page-faults all of them in again: ResNet-18 with 1,000 classes, one sample per call,
    took 35.2 s with 1.16 M page faults against 25.4 s with 0.16 M when the heap was kept
    (4.8 GiB resident of an 11.3 GiB budget); a batch of 2 under a 12 GiB budget 61.6 s with
    1.11 M faults against 66.0 s with 2.19 M. Kept only up to half the budget: the next
    sweep's :class:`Resident` trims once it grows by another half, so a batch stays within the
    budget (without any trim, ResNet-50 at batch 8 under 8 GiB grew sample after sample to
    14.4 GiB). With the default budget (half the available memory) a 24 GB machine often
    holds more than half of it after such a sweep (5.4 GiB of 9.2 GiB): then the memory goes
    back as before."""
    resident = resident_bytes()
    if not resident or resident > memory_budget() // 2:
        release_freed()


_statm: tuple[int, int] | None = None  # (pid, descriptor of its /proc/self/statm)


def resident_bytes() -> int:
    """The process's resident size now (0 where /proc is not there).

    Read from a descriptor kept open (per process: a forked child opens its own), since opening
    the file for each of a class-chunked sweep's thousands of chunks took 3.5% of a ResNet-18
    explanation at K = 1,000 (py-spy); reading it again costs a few microseconds."""
    global _statm
    try:
        if _statm is None or _statm[0] != os.getpid():
            _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
        return int(os.pread(_statm[1], 256, 0).split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Resident:
    """Keeps a long chunked sweep near the memory its plan counted.

    The plan counts live arrays, but the allocator keeps what they free for later ones (in every
    thread's arena, onnxruntime's temporaries too), and chunk after chunk that grows the process
    past its budget: on ResNet-18 with 1,000 classes and a 2 GiB budget it peaked 2.7 GiB above
    its start, and a six-layer model with a 128 MiB budget grew by 485 MiB. :meth:`check`,
    called after each chunk, hands freed memory back (:func:`release_freed`) whenever the
    process has grown by more than half the budget since the sweep began (with the whole budget
    as the threshold the six-layer model still grew by 199 MiB; with half, by 158 MiB under a
    128 MiB budget and under a 256 MiB one), for the price of reading /proc/self/statm per
    chunk and a trim now and then."""

    def __init__(self) -> None:
        self.start = resident_bytes()
        self.limit = memory_budget() // 2

    def check(self) -> None:
        if self.start and resident_bytes() - self.start > self.limit:
            release_freed()


def heap_array_limit() -> int:
    """The largest array :func:`reused_heap` serves from the heap: a share of the budget."""
    return int(min(HEAP_MAX_ARRAY, max(_GLIBC_DEFAULT, memory_budget() * HEAP_BUDGET_SHARE)))


@contextlib.contextmanager
def reused_heap() -> Iterator[None]:
    """Large temporaries reuse freed heap memory while the block runs (also a decorator).

    A sweep allocates and frees cotangents of tens of MB thousands of times. glibc serves each
    from a fresh mapping and returns it at ``free``, so every one is page-faulted and zeroed
    again: measured here, a 16 MB temporary cost 16 ms against 9 ms from the heap, and a
    ResNet-18 pathwise explanation with 1,000 classes took 53.6 s against 42.5 s. Inside the
    block (nesting and threads count), arrays up to :func:`heap_array_limit` come from the heap
    and freed memory is kept for the next one; at its end the thresholds go to where glibc's own
    dynamic policy takes them in a process that has freed large arrays (:data:`_GLIBC_DYNAMIC_MAX`:
    arrays up to 32 MiB from the heap, free memory above 64 MiB at its top returned), not to
    the 128 KiB defaults, which would leave the host program's large arrays page-faulted anew
    at every allocation for the rest of the process. (An
    explicit ``malloc_trim`` at the end cost more than it gave: a MobileNet-V2 explanation
    took 483 ms with it, 368 ms without, 400 ms with no reuse at all.) The limit is a share of
    the budget because the heap fragments: with every size recycled, a sweep planned for a
    64 MiB budget peaked 78 MiB higher (tests/test_class_chunks.py). Elsewhere than glibc this
    does nothing.
    """
    mallopt = _mallopt()
    global _heap_users
    if mallopt is not None:
        with _heap_lock:
            _heap_users += 1
            if _heap_users == 1:
                largest = heap_array_limit()
                mallopt(_M_MMAP_THRESHOLD, largest)  # type: ignore[operator]
                mallopt(_M_TRIM_THRESHOLD, 2 * largest)  # type: ignore[operator]
    try:
        yield
    finally:
        if mallopt is not None:
            with _heap_lock:
                _heap_users -= 1
                if _heap_users == 0:
                    mallopt(_M_MMAP_THRESHOLD, _GLIBC_DYNAMIC_MAX)  # type: ignore[operator]
                    mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_DYNAMIC_MAX)  # type: ignore[operator]
