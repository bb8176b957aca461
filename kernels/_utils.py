"""Launch helpers shared by the Triton host functions.

Kept free of any kernel: block-size and warp choices, input checks, and a
stand-in for ``triton`` so that the op files (and their torch references)
import where Triton is missing.
"""
import torch

from ._dispatch import interpreted

try:
    import triton

    HAS_TRITON = True
except ImportError:  # CPU-only install: the references still work
    triton = None
    HAS_TRITON = False


class _MissingTriton:
    """Stand-in for ``triton`` / ``triton.language`` when Triton is absent.

    ``@triton.jit`` returns the function unchanged and ``tl.constexpr`` is a
    plain annotation, so kernel definitions still parse; the host functions
    call :func:`require_triton` before touching anything else.
    """

    constexpr = object

    @staticmethod
    def jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)


triton_stub = tl_stub = _MissingTriton()


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use the torch reference (ENGINE_KERNELS=torch)")


def _patch_interpreter_index() -> None:
    """Let interpreted loops take run-time bounds under NumPy >= 2.4.

    Triton 3.6's interpreter keeps scalars as 1-element arrays and converts
    them with ``int(array)``, which NumPy 2.4 rejects for ndim > 0, so
    ``for i in range(lo, hi)`` with loaded bounds fails. Re-point
    ``tensor.__index__`` at the element itself; compiled kernels are untouched.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_engine_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._engine_patched = True
    interpreter._patch_lang_tensor = patched


if HAS_TRITON and interpreted():
    _patch_interpreter_index()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def gqa_pack(group: int, block_m: int) -> int:
    """Query heads packed per program of the attention kernels: the largest power of two dividing
    the GQA ratio ``group`` (Hq / Hkv) that leaves at least 16 tokens in a ``block_m`` block."""
    pack = 1
    while group % (pack * 2) == 0 and block_m // (pack * 2) >= 16 and pack < 8:
        pack *= 2
    return pack


def warps_for(block_elems: int) -> int:
    """Warps for a program touching ``block_elems`` elements (elementwise / row kernels)."""
    if block_elems >= 16384:
        return 16
    if block_elems >= 4096:
        return 8
    if block_elems >= 1024:
        return 4
    return 2 if block_elems >= 256 else 1


def row_block(n_cols: int, max_cols: int = 65536):
    """Block over one row of ``n_cols`` elements for single-pass row kernels."""
    if n_cols > max_cols:
        raise ValueError(f"rows of {n_cols} elements exceed the single-block limit {max_cols}")
    return next_pow2(n_cols)


def rows_per_program(block_cols: int, target_elems: int = 4096, max_rows: int = 16) -> int:
    """How many rows one program handles so that small rows still fill a program.

    Fixed by the row width alone, never by the number of rows: a batch of fewer rows masks
    the rest, so every batch size runs the one compiled variant.
    """
    return next_pow2(max(1, min(max_rows, target_elems // block_cols)))


def check_tensor(t: torch.Tensor, name: str, ndim: int = None, dtypes=None, device=None) -> None:
    """Assert the properties every host function relies on, with a readable message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {tuple(dtypes)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    """Kernels take explicit strides but want the innermost one to be 1."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def version_of(t) -> int:
    """In-place version counter of a tensor; inference-mode tensors have none (0)."""
    return 0 if t.is_inference() else t._version


class ScheduleCache:
    """One-entry cache so that every layer of a batch shares one program schedule.

    Keyed on the identity and in-place version of the metadata tensors; it holds
    references to them, so a freed tensor's id cannot be reused while cached.
    Bypassed while a CUDA graph is being captured, so that the build is recorded
    in the graph and replays follow the metadata buffers.
    """

    def __init__(self):
        self.entry = None  # (key, referenced tensors, schedule)

    def get(self, tensors, params, build):
        if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
            return build()
        key = (tuple(None if t is None else (id(t), version_of(t)) for t in tensors), params)
        entry = self.entry  # one read: other threads may replace it
        if entry is not None and entry[0] == key and all(a is b for a, b in zip(entry[1], tensors)):
            return entry[2]
        value = build()
        self.entry = (key, tuple(tensors), value)
        return value

