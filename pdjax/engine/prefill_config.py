"""The prefill engine's configuration (no JAX: the router and the
configuration read it without starting a backend)."""

from __future__ import annotations

import dataclasses

from pdjax.engine.kv_dtype import (DEFAULT_KV_DTYPE, check_kv_dtype,
                                   kv_storage_dtype)
from pdjax.engine.xla_options import check_on_off


CACHED_PREFIX = ("shrinking", "always")


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
  buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
  max_batch: int = 4
  # Prompt tokens one batched program may hold (0: no cap), as vLLM's
  # max_num_batched_tokens: long buckets run fewer prompts at a time, which
  # bounds what one program allocates (4 x 8192 tokens of an 8B model want
  # 7.7 GiB at once, beside a decode worker's page pool).
  max_batch_tokens: int = 0
  page_size: int = 16
  max_seq_len: int = 1024
  # Bucketed prompts run their layers as this many programs, so each
  # group's KV can be handed off while later layers compute (1: one fused
  # program). Chunked and prefix-cached prompts always run fused.
  layer_groups: int = 1
  # GEMM kernels of the prefill programs on GPUs: "on" Triton (XLA's
  # default), "off" cuBLAS, "auto" cuBLAS: at 128-8192 tokens it runs the
  # 8B prefill 1.57x-1.07x faster than Triton (H200,
  # docs/notes/2026-11-26-h200-prefill-gemm.md), and prefill programs
  # always have at least 16 rows.
  triton_gemm: str = "auto"
  # XLA's DotMerger: "on" (XLA's default) joins the q/k/v dots of a layer
  # into one against their weights' concatenation, a copy of those weights
  # per call (DecodeConfig.merge_dots); "off" keeps them apart. "auto": off.
  # The one wider GEMM does not make up for the copy: 8B prefill on an
  # H100, 54.5 ms either way at 2K tokens, 233.9 (off) vs 236.1 ms at 8K.
  merge_dots: str = "auto"
  # The dtype of the KV this engine hands on ("auto": the model's; "fp8":
  # e4m3, as the decode pool stores it: pdjax.engine.kv_dtype). Its own
  # buffers and prefix cache keep the model's dtype.
  kv_dtype: str = DEFAULT_KV_DTYPE
  # Which cached prefixes a prompt that fits a bucket starts from: "always"
  # any, "shrinking" only one that leaves the rest to a smaller bucket than
  # the whole prompt's (a prompt longer than every bucket takes any). A
  # chunk after a cached prefix runs a costlier program than the bucketed
  # one of its length: on an H100 (8B, multiturn), prompts whose rest
  # stayed in their bucket took 1.5-3x longer to a first token from their
  # prefix than without it (docs/notes/2026-12-06-h100-reserve-gc-prefix-
  # identity.md).
  cached_prefix: str = "shrinking"

  def __post_init__(self):
    check_kv_dtype(self.kv_dtype)
    if self.cached_prefix not in CACHED_PREFIX:
      raise ValueError(f"cached_prefix must be one of "
                       f"{', '.join(CACHED_PREFIX)}, got "
                       f"{self.cached_prefix!r}")
    check_on_off("triton_gemm", self.triton_gemm)
    check_on_off("merge_dots", self.merge_dots)
    if self.layer_groups < 1:
      raise ValueError(f"layer_groups must be >= 1, got {self.layer_groups}")
    if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
      raise ValueError(f"buckets must be increasing, got {self.buckets}")
    for b in self.buckets:
      if b % self.page_size:
        raise ValueError(f"bucket {b} is not a multiple of page_size "
                         f"{self.page_size}")
    if self.max_seq_len % self.page_size:
      raise ValueError(f"max_seq_len {self.max_seq_len} is not a multiple of "
                       f"page_size {self.page_size}")
    if self.max_batch_tokens < 0:
      raise ValueError(f"max_batch_tokens must be >= 0 (0: no cap), got "
                       f"{self.max_batch_tokens}")

  def kv_storage_dtype(self, model_dtype):
    """The handed-on KV's dtype for a model of ``model_dtype``."""
    return kv_storage_dtype(self.kv_dtype, model_dtype)

  @property
  def chunk(self) -> int:
    return self.buckets[-1]

  def bucket_for(self, n: int) -> int | None:
    for b in self.buckets:
      if n <= b:
        return b
    return None

  def payload_page_counts(self) -> list[int]:
    """Every page count ``RequestKV.kv.shape[2]`` a prefill with this config
    can produce (a decode pool compiles one insert program per count): the
    buckets' page counts, and every power of two up to the longest prompt's
    (the buffered path: chunked prompts, cached prefixes, skipped pages)."""
    from pdjax.engine.kv import payload_pages
    top = payload_pages(self.max_seq_len // self.page_size)
    counts = {b // self.page_size for b in self.buckets}
    counts.update(1 << i for i in range(top.bit_length()))
    return sorted(counts)

  def layer_group_sizes(self, num_layers: int) -> list[int]:
    """Layers per group, as even as possible (at most two sizes, so at
    most two group programs per bucket and batch size)."""
    g = min(self.layer_groups, num_layers)
    return [num_layers // g + (i < num_layers % g) for i in range(g)]

  def batch_limit(self, bucket: int) -> int:
    """Prompts one program of ``bucket`` tokens runs at most (always 1 or
    more: a prompt longer than the cap still runs, alone)."""
    if not self.max_batch_tokens:
      return self.max_batch
    return max(1, min(self.max_batch, self.max_batch_tokens // bucket))

  def batch_sizes(self, bucket: int) -> list[int]:
    """The batch sizes compiled for ``bucket``: powers of two, then its
    limit."""
    return _ladder(self.batch_limit(bucket))

  @property
  def chunk_buffer_len(self) -> int:
    """Positions of a buffered prefill's KV buffer: room for the longest
    prompt plus one chunk (a chunk is a whole bucket however few of its
    tokens are real, and after a cached prefix it starts at any page, so
    the last one may reach up to a bucket past the prompt; without that
    room ``dynamic_update_slice`` would move a write that does not fit back
    over the prefix, silently)."""
    C = self.chunk
    return -(-self.max_seq_len // C) * C + C

  @property
  def chunk_buffer_lens(self) -> list[int]:
    """The lengths a buffered prefill's KV buffers come in, ascending:
    ``chunk_buffer_len``, and a quarter of it again and again while that
    holds the smallest bucket in whole pages. Each prompt takes the shortest
    that holds it (``buffer_len_for``): a chunk program moves its whole
    buffer through every layer, so a short prompt after a short prefix in
    the longest buffer pays for positions it never uses (8B on an H100: a
    512-token chunk 31.5 ms in a 16,384-position buffer, 27.0 in 4,096,
    25.8 in 1,024; the plain prefill of those tokens 24.7-25.1)."""
    out = [self.chunk_buffer_len]
    while (out[0] // 4 >= self.buckets[0]
           and (out[0] // 4) % self.page_size == 0):
      out.insert(0, out[0] // 4)
    return out

  def buffer_len_for(self, prompt_len: int, cached_tokens: int) -> int:
    """The buffer a prompt of ``prompt_len`` tokens takes after a cached
    prefix of ``cached_tokens``: room for the prompt and for its last
    chunk's padding (a chunk is a whole bucket, at most the bucket of what
    follows the prefix, so the prompt's length plus that bucket bounds
    every chunk's end however a token budget cuts them)."""
    rest = prompt_len - cached_tokens
    last = min(self.bucket_for(rest) or self.chunk, self.chunk)
    return next(n for n in self.chunk_buffer_lens
                if n >= prompt_len + last)

  def cached_batch_limit(self, bucket: int) -> int:
    """Prompts with a cached prefix one chunk program of ``bucket`` tokens
    runs at most: as ``batch_limit``, and, where ``max_batch_tokens`` caps
    what one program allocates, its rows' buffers (``chunk_buffer_len``
    positions each) count against that cap."""
    limit = self.batch_limit(bucket)
    if self.max_batch_tokens:
      limit = min(limit, self.max_batch_tokens // self.chunk_buffer_len)
    return max(1, limit)

  def cached_batch_sizes(self, bucket: int) -> list[int]:
    """The row counts compiled for cached-prefix chunks of ``bucket``."""
    return _ladder(self.cached_batch_limit(bucket))


def _ladder(limit: int) -> list[int]:
  """Powers of two below ``limit``, then ``limit``."""
  out, b = [], 1
  while b < limit:
    out.append(b)
    b *= 2
  return out + [limit]


__all__ = ["PrefillConfig"]
