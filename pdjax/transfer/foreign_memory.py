"""A JAX array over device memory that JAX did not allocate, without a copy.

The CUDA IPC path lands a request's KV in a buffer the decode worker
allocated with ``cuMemAlloc`` (XLA's own buffers cannot be exported). Copying
it out into a JAX array costs a full read and write of the KV on the
receiving GPU, which made the same-host hand-off run at 62% of the link
(docs/notes/2026-11-25-h100x2-engines.md). Instead the landing region is
handed to JAX as a view through DLPack: the decode engine's insert program
reads the KV straight from the landing buffer into its page pools, the one
device-local copy the hand-off needs.

DLPack is the interchange JAX imports zero-copy (``jax.dlpack.from_dlpack``
makes a view when the memory is on one of its devices and suitably
aligned). CuPy could wrap a raw pointer, but it has no bfloat16, and a
uint16 view would need a bitcast, which is another copy. So this module
builds the DLPack capsule itself with ``ctypes``: a few plain C structs
(https://dmlc.github.io/dlpack/latest/c_api.html), no extra dependency, and
the same code serves CPU memory in tests (``kDLCPU``) and GPU memory on GPUs
(``kDLCUDA``).

JAX's DLPack import has no 8-bit floats (an FP8 deployment's KV): ``view``
gives those as their bytes (uint8), and ``retype`` reads the bytes as the
dtype, one device copy of them (half a bf16 KV's) made each time it is
called, so a view kept for later hand-offs stays a view.

The view does not own the memory: whoever lent it must keep it unchanged and
allocated until nothing reads the array (``RequestKV.release`` says when).
"""

from __future__ import annotations

import ctypes
import threading

import jax
import numpy as np

KDL_CPU, KDL_CUDA = 1, 2
_KDL_INT, _KDL_UINT, _KDL_FLOAT, _KDL_BFLOAT = 0, 1, 2, 4


class _DLDevice(ctypes.Structure):
  _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
  _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8),
              ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
  _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice),
              ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
              ("shape", ctypes.POINTER(ctypes.c_int64)),
              ("strides", ctypes.POINTER(ctypes.c_int64)),
              ("byte_offset", ctypes.c_uint64)]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _DLManagedTensor(ctypes.Structure):
  """DLPack < 1.0 ("dltensor" capsules)."""
  _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
              ("deleter", _DELETER)]


class _DLPackVersion(ctypes.Structure):
  _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
  """DLPack >= 1.0 ("dltensor_versioned" capsules)."""
  _fields_ = [("version", _DLPackVersion), ("manager_ctx", ctypes.c_void_p),
              ("deleter", _DELETER), ("flags", ctypes.c_uint64),
              ("dl_tensor", _DLTensor)]


_CAPSULE_NAMES = {False: b"dltensor", True: b"dltensor_versioned"}

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]

# The C structs (and the shape/stride arrays they point to) must outlive the
# capsule until the consumer calls the deleter; they live here, by address.
_live: dict[int, tuple] = {}
_live_lock = threading.Lock()


@_DELETER
def _delete(address):
  with _live_lock:
    _live.pop(address, None)


def _dl_dtype(dtype) -> _DLDataType:
  dt = np.dtype(dtype)
  if dt == jax.numpy.bfloat16:
    code = _KDL_BFLOAT
  elif dt.kind == "f":
    code = _KDL_FLOAT
  elif dt.kind == "u":
    code = _KDL_UINT
  elif dt.kind == "i":
    code = _KDL_INT
  else:
    raise TypeError(f"no DLPack view for dtype {dt}")
  return _DLDataType(code, dt.itemsize * 8, 1)


def _byte_float(dtype) -> bool:
  """An 8-bit float (ml_dtypes' float8 types): no DLPack code JAX imports."""
  dt = np.dtype(dtype)
  return dt.itemsize == 1 and dt.kind not in "iub"


def viewable(dtype) -> bool:
  """Whether ``view`` can import this dtype (8-bit floats as bytes)."""
  if _byte_float(dtype):
    return True
  try:
    _dl_dtype(dtype)
    return True
  except TypeError:
    return False


def live_views() -> int:
  """Capsules made here whose consumer has not released them yet."""
  with _live_lock:
    return len(_live)


class _Producer:
  """The two DLPack protocol methods over one raw pointer."""

  def __init__(self, ptr: int, shape, dtype, device_type: int,
               device_id: int):
    self.ptr, self.shape, self.dtype = ptr, tuple(int(s) for s in shape), dtype
    self.device_type, self.device_id = device_type, device_id
    self.capsule = None
    self.name = b""
    self.address = 0

  def __dlpack_device__(self):
    return (self.device_type, self.device_id)

  def __dlpack__(self, stream=None, max_version=None, dl_device=None,
                 copy=None):
    # The bytes are complete before the view is made (the sender
    # synchronised its copy before it sent the handle): no stream to order.
    del stream, dl_device
    if copy:
      raise BufferError("this producer only makes views")
    versioned = max_version is not None and tuple(max_version) >= (1, 0)
    ndim = len(self.shape)
    shape = (ctypes.c_int64 * max(ndim, 1))(*self.shape)
    strides = (ctypes.c_int64 * max(ndim, 1))()
    step = 1
    for i in reversed(range(ndim)):   # compact row-major, in elements
      strides[i] = step
      step *= self.shape[i]
    tensor = _DLTensor(self.ptr, _DLDevice(self.device_type, self.device_id),
                       ndim, _dl_dtype(self.dtype), shape, strides, 0)
    if versioned:
      managed = _DLManagedTensorVersioned(_DLPackVersion(1, 0), None,
                                          _delete, 0, tensor)
    else:
      managed = _DLManagedTensor(tensor, None, _delete)
    self.address = ctypes.addressof(managed)
    with _live_lock:
      _live[self.address] = (managed, shape, strides)
    self.name = _CAPSULE_NAMES[versioned]
    self.capsule = _capsule_new(self.address, self.name, None)
    return self.capsule

  def forget_if_unconsumed(self) -> None:
    """A consumer renames the capsule when it takes it; one that failed
    before that never calls the deleter, so the structs are dropped here."""
    if self.capsule is not None and _capsule_is_valid(self.capsule,
                                                       self.name):
      with _live_lock:
        _live.pop(self.address, None)
    self.capsule = None


def view(ptr: int, shape, dtype, device: jax.Device) -> jax.Array:
  """``shape`` elements of ``dtype`` at ``ptr`` (compact, row-major) as a
  JAX array on ``device``, sharing the memory (8-bit floats as uint8:
  ``retype``). ``ptr`` is an address in
  this process: GPU memory of ``device`` on GPUs, host memory on CPU.

  Raises ``TypeError`` / ``BufferError`` / ``RuntimeError`` where JAX cannot
  import it (unsupported dtype, platform or alignment)."""
  if device.platform == "cpu":
    device_type = KDL_CPU
  elif device.platform in ("gpu", "cuda"):
    device_type = KDL_CUDA
  else:
    raise RuntimeError(f"no DLPack view of memory on {device.platform}")
  hw = getattr(device, "local_hardware_id", None)
  byte_float = _byte_float(dtype)
  producer = _Producer(ptr, shape, np.uint8 if byte_float else dtype,
                       device_type, int(device.id if hw is None else hw))
  try:
    arr = jax.dlpack.from_dlpack(producer, copy=False)
  finally:
    producer.forget_if_unconsumed()
  if arr.devices() != {device}:
    raise RuntimeError(f"the view landed on {arr.devices()}, not {device}")
  return arr


def retype(arr: jax.Array, dtype) -> jax.Array:
  """A ``view`` of ``dtype`` as that dtype: itself, or for an 8-bit float
  (viewed as uint8) a copy of its bytes read as ``dtype``."""
  if _byte_float(dtype) and arr.dtype != np.dtype(dtype):
    return jax.lax.bitcast_convert_type(arr, np.dtype(dtype))
  return arr


__all__ = ["view", "viewable", "live_views", "KDL_CPU", "KDL_CUDA"]
