"""A decode pool's shape and settings: rows, pages, steps per call, and the
kernel choices of its programs (one frozen value, read by every part of the
pool)."""

from __future__ import annotations

import dataclasses
import math

from pdjax.engine.kv_dtype import (DEFAULT_KV_DTYPE, check_kv_dtype,
                                   kv_storage_dtype)
from pdjax.engine.xla_options import check_on_off


# The smallest generate program (DecodeConfig.row_buckets says why).
MIN_PROGRAM_ROWS = 8


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  max_seqs: int = 8          # rows per replica
  page_size: int = 16
  num_pages: int = 256       # per replica, the null page included
  max_seq_len: int = 1024    # prompt + generated, per sequence
  steps_per_call: int = 4
  # Widths (in pages) of the page table a generate program reads. Each call
  # uses the smallest that covers its longest row, so attention gathers
  # what the batch needs, not max_seq_len for everyone. One program per
  # width; () = powers of two up to max_seq_len / page_size.
  table_buckets: tuple[int, ...] = ()
  # Row counts of the generate programs. Each call runs the smallest that
  # holds the rows it advances (the others keep their state untouched), so
  # one stream does not pay for a program of max_seqs rows. One program per
  # count; () = MIN_PROGRAM_ROWS x powers of 4 below max_seqs, then
  # max_seqs. The smallest is 8: on GPUs XLA pads a bf16 GEMM's rows to a
  # multiple of 8, in a kernel of its own before each product, so a
  # program of fewer rows runs the same GEMMs plus those pads (Llama-3-8B,
  # H100, 1K context: one live row 6.52-6.53 ms a step in an 8-row
  # program against 6.67-6.84 in a 2-row one, four live rows 6.56-6.58
  # against 6.79 in a 4-row one); and one row alone runs matrix-vector
  # products that neither cuBLAS nor XLA's Triton GEMMs run at HBM rate
  # (H200: 19.4 / 12.6 ms against 5.6 ms at two rows with cuBLAS).
  row_buckets: tuple[int, ...] = ()
  # Speculative decoding: "ngram" drafts up to ``spec_tokens`` tokens per
  # row and call by prompt lookup (the latest earlier occurrence of the
  # sequence's last ``spec_ngram`` .. 1 tokens) and checks them in one pass
  # of the model (``pdjax.engine.speculative``); a row keeps the longest
  # prefix the model agrees with, plus one token of its own. "draft": a
  # smaller model of the same tokenizer drafts them (its greedy tokens,
  # with its own paged KV: ``pdjax.engine.draft_model``; the engine is given
  # its weights). "off": plain decoding. Drafts need the previous call's
  # tokens, so a speculating pool does not dispatch a call before the last
  # one's tokens are read.
  speculative: str = "off"
  spec_tokens: int = 4
  spec_ngram: int = 3
  # Storage of the KV pool's pages: "auto" (the model's dtype) or "fp8"
  # (float8 e4m3, half a bf16 pool's bytes: twice the tokens in the same
  # memory; pdjax.engine.kv_dtype). Attention widens them to the model's
  # dtype: on one GPU in place, by pdjax's Pallas kernel (attention "auto";
  # cuDNN's paged attention reads no FP8), else gathering the pages.
  kv_dtype: str = DEFAULT_KV_DTYPE
  # A decode worker that prefills its own requests (colocated serving):
  # prompt tokens of prefill compute between two generate calls, at most
  # (bucket lengths, as compiled). A prompt beyond it is prefilled in
  # chunks over several iterations, so a long prompt delays the running
  # rows' next tokens by one budget's compute, not by its whole prefill
  # (vLLM's and SGLang's chunked prefill). 0: no bound (each iteration
  # prefills up to max_batch waiting prompts whole).
  prefill_token_budget: int = 0
  # How admission promises KV pages. "on_demand": a request's reservation
  # covers its prompt and its first two calls' tokens, and admission keeps
  # ``admission_watermark`` of the pool free for the running rows; a row
  # then allocates pages as it generates, and when the pool cannot give a
  # row the pages of its next call the newest rows are preempted (their KV
  # moved to host memory, ``swap_pages``, or dropped and recomputed) and
  # resumed once pages free up: vLLM's and SGLang's paged scheduling.
  # "full": a request's whole budget (prompt + max_tokens, capped by
  # max_seq_len) is reserved before its KV exists and nothing is ever
  # preempted; a chat request without max_tokens then holds a whole
  # context of pages (the policy before on-demand paging, kept for
  # comparison).
  kv_admission: str = "on_demand"
  # on_demand: share of the pool's pages admission leaves free for the
  # running rows' growth (vLLM's watermark), while rows run.
  admission_watermark: float = 0.01
  # on_demand: host memory for preempted rows' KV, in pool pages (each
  # page_size tokens of every layer's K and V). A preempted row whose pages
  # fit is swapped out and back bit for bit; one that does not is dropped
  # and recomputed (prompt and tokens so far prefilled again). -1: as many
  # pages as the pool holds; 0: recompute only.
  swap_pages: int = -1
  # Keep finished sequences' full blocks, named by content, for requests
  # that share a prefix (they are evicted, least recently used first, only
  # when pages are needed).
  prefix_caching: bool = False
  # Host KV tier (pdjax.engine.host_tier): blocks evicted from the pool are
  # kept in host memory, up to this many, and uploaded back on a later hit
  # instead of recomputed. 0 = off; needs prefix_caching.
  host_cache_blocks: int = 0
  # GEMM kernels of the generate programs on GPUs: XLA's Triton GEMMs
  # ("on"), the vendor library's ("off": cuBLAS), or "auto": per program,
  # cuBLAS from CUBLAS_MIN_ROWS rows on, Triton below. At decode shapes (a
  # few rows times a whole weight matrix) cuBLAS steps 1.6-2.1x faster from
  # 2 rows on and 1.5x slower at 1 (H200, 8B, 2026-12-05: 5.6 vs 12.0 ms
  # at 2 rows, 19.4 vs 12.6 ms at 1; earlier row counts in
  # docs/notes/2026-11-26-h200-decode-kernels.md).
  triton_gemm: str = "auto"
  # XLA's DotMerger ("on", XLA's default) turns dots that share an input
  # (q/k/v of a layer) into one dot against the concatenation of their
  # weights. The layer loop's weights are slices of stacked arrays, so that
  # concatenation is a copy of those weights on every step: 1.3 ms of a
  # 9.5 ms step at 32 rows (8B, H100, tools/profile_decode.py). "off" keeps
  # the dots apart; "auto": off (8.5 vs 9.4 ms at 32 rows, 13.8 vs 14.6 at
  # 128, docs/notes/2026-11-26-h100-dot-merger.md).
  merge_dots: str = "auto"
  # How attention reads a row's pages: "gather" them into a dense buffer
  # per layer (every backend); "paged": cuDNN's paged attention reads them
  # in place (GPUs, one device per replica, a pool of the model's dtype);
  # "pallas": pdjax's Pallas kernel reads them in place (GPUs, one device
  # per replica, any pool dtype: pdjax.model.pallas_attention); "auto":
  # cuDNN's where it applies, else Pallas (an FP8 pool, a block count
  # cuDNN does not take), else the gather.
  attention: str = "auto"
  # Pipeline-parallel pools (a ``pp`` mesh axis, pdjax/shardings/decode_dp_pp):
  # each generate call's rows run through the stages in this many
  # microbatches, padded with inactive rows to a multiple of it; a step
  # leaves the stages idle (pp - 1) / (num_microbatches + pp - 1) of the
  # time. 0: one microbatch per stage. Pools without stages ignore it.
  num_microbatches: int = 0
  # Batch-invariant decoding: a row's arithmetic never depends on the other
  # rows of its calls, so a greedy stream's tokens are the same alone or
  # beside any others, and with speculation on or off. GPU kernels (cuBLAS,
  # cuDNN, XLA's fusions) are chosen per shape, and a row of a kernel of a
  # fixed shape does not depend on the other rows' values; so every
  # generate call runs one program shape, max_seqs rows and a page table of
  # pages_per_seq pages, and a speculating pool's verify runs each of a
  # row's spec_tokens + 1 positions as one row of a max_seqs-row decode
  # step (``llama.decode_tokens_as_steps``). Attention is XLA's, over the
  # gathered pages: cuDNN's decode attention is not deterministic run to
  # run on GPUs (``_Programs``). What it costs: one stream pays for a
  # max_seqs-row step reading every page-table column (the row and width
  # buckets are off), and a verify call's drafts share what the step's
  # rows leave (max_seqs less the live rows: ``draft_room``), so
  # speculation drafts less as more rows run. The prefill of a prompt is
  # not covered: it still depends on the prompts batched with it
  # (PrefillConfig.max_batch).
  batch_invariant: bool = False

  def __post_init__(self):
    if self.attention not in ("auto", "paged", "pallas", "gather"):
      raise ValueError(f"attention must be auto, paged, pallas or gather, "
                       f"got {self.attention!r}")
    check_on_off("triton_gemm", self.triton_gemm)
    check_on_off("merge_dots", self.merge_dots)
    if self.kv_admission not in ("on_demand", "full"):
      raise ValueError(f"kv_admission must be on_demand or full, got "
                       f"{self.kv_admission!r}")
    if not 0.0 <= self.admission_watermark < 1.0:
      raise ValueError(f"admission_watermark must be in [0, 1), got "
                       f"{self.admission_watermark}")
    if self.swap_pages < -1:
      raise ValueError(f"swap_pages must be >= -1 (-1: the pool's size), "
                       f"got {self.swap_pages}")
    if self.host_cache_blocks < 0:
      raise ValueError(f"host_cache_blocks {self.host_cache_blocks} < 0")
    if self.max_seq_len % self.page_size:
      raise ValueError(f"max_seq_len {self.max_seq_len} is not a multiple of "
                       f"page_size {self.page_size}")
    for b in self.table_buckets:
      if not 0 < b <= self.pages_per_seq:
        raise ValueError(f"table bucket {b} outside (0, {self.pages_per_seq}]")
    check_kv_dtype(self.kv_dtype)
    if self.speculative not in ("off", "ngram", "draft"):
      raise ValueError(f"speculative must be 'off', 'ngram' or 'draft', got "
                       f"{self.speculative!r}")
    if self.spec_tokens < 1 or self.spec_ngram < 1:
      raise ValueError(f"spec_tokens ({self.spec_tokens}) and spec_ngram "
                       f"({self.spec_ngram}) must be >= 1")
    if self.num_microbatches < 0:
      raise ValueError(f"num_microbatches must be >= 0 (0: one per "
                       f"pipeline stage), got {self.num_microbatches}")
    if self.prefill_token_budget < 0:
      raise ValueError(f"prefill_token_budget must be >= 0 (0: no bound), "
                       f"got {self.prefill_token_budget}")
    for b in self.row_buckets:
      if not 0 < b <= self.max_seqs:
        raise ValueError(f"row bucket {b} outside (0, {self.max_seqs}]")
    if self.batch_invariant:
      self._check_batch_invariant()

  def _check_batch_invariant(self) -> None:
    """A batch-invariant pool runs one program shape; its verify calls
    need room for at least one row's positions."""
    if set(self.row_buckets) - {self.max_seqs}:
      raise ValueError(
          f"batch_invariant runs every generate call at max_seqs "
          f"({self.max_seqs}) rows: row_buckets {self.row_buckets} would "
          "give a row a program of another shape; leave them empty")
    if set(self.table_buckets) - {self.pages_per_seq}:
      raise ValueError(
          f"batch_invariant runs every generate call with the whole page "
          f"table ({self.pages_per_seq} pages): table_buckets "
          f"{self.table_buckets} would give a row a program of another "
          "shape; leave them empty")
    if self.attention in ("paged", "pallas"):
      raise ValueError(
          "batch_invariant attends with XLA's attention over gathered "
          "pages (cuDNN's decode attention, the paged kernel included, "
          "is not deterministic run to run, and a paged kernel's blocking "
          f"depends on the rows): attention={self.attention!r} cannot "
          "apply; use 'auto' or 'gather'")
    if self.speculative != "off" and self.spec_tokens + 1 > self.max_seqs:
      raise ValueError(
          f"batch_invariant verifies each of a row's spec_tokens + 1 "
          f"({self.spec_tokens + 1}) positions as one of the decode "
          f"step's max_seqs ({self.max_seqs}) rows: spec_tokens must be "
          f"below max_seqs")

  @property
  def on_demand(self) -> bool:
    """Pages allocated as rows grow, with preemption (``kv_admission``)."""
    return self.kv_admission == "on_demand"

  @property
  def swap_capacity(self) -> int:
    """Host pages for preempted rows' KV per replica (0: none)."""
    if not self.on_demand:
      return 0
    return self.num_pages - 1 if self.swap_pages < 0 else self.swap_pages

  @property
  def watermark_pages(self) -> int:
    """Pages on_demand admission leaves free while rows run."""
    return math.ceil(self.admission_watermark * (self.num_pages - 1))

  def kv_storage_dtype(self, model_dtype):
    """The pool's dtype for a model of ``model_dtype``."""
    return kv_storage_dtype(self.kv_dtype, model_dtype)

  @property
  def first_calls_tokens(self) -> int:
    """Tokens past the prompt whose pages a row gets at insert, before it
    grows: its first two generate calls' (the first call, and the one
    dispatched before the first call's tokens are read)."""
    return 2 * self.tokens_per_call

  @property
  def tokens_per_call(self) -> int:
    """The most tokens one call advances a row by (and writes the KV of)."""
    if self.speculative != "off":
      return self.spec_tokens + 1
    return self.steps_per_call

  @property
  def pages_per_seq(self) -> int:
    return self.max_seq_len // self.page_size

  @property
  def widths(self) -> tuple[int, ...]:
    """Page-table widths, increasing, the last always pages_per_seq (the
    only one in a batch-invariant pool)."""
    if self.batch_invariant:
      return (self.pages_per_seq,)
    if self.table_buckets:
      out = sorted(set(self.table_buckets))
    else:
      out, w = [], 1
      while w < self.pages_per_seq:
        out.append(w)
        w *= 2
    if not out or out[-1] != self.pages_per_seq:
      out.append(self.pages_per_seq)
    return tuple(out)

  def width_for(self, pages: int) -> int:
    return next(w for w in self.widths if w >= pages)

  @property
  def row_counts(self) -> tuple[int, ...]:
    """Row counts of the generate programs, increasing, the last always
    max_seqs (the only one in a batch-invariant pool)."""
    if self.batch_invariant:
      return (self.max_seqs,)
    if self.row_buckets:
      out = sorted(set(self.row_buckets))
    else:
      out, b = [], MIN_PROGRAM_ROWS
      while b < self.max_seqs:
        out.append(b)
        b *= 4
    if not out or out[-1] != self.max_seqs:
      out.append(self.max_seqs)
    return tuple(out)

  def rows_for(self, rows: int) -> int:
    """The row count of the program that advances ``rows`` rows."""
    return next(b for b in self.row_counts if b >= rows)

  @property
  def steps_without_room(self) -> int:
    """Steps of a batch-invariant speculating pool's call whose live rows
    leave no room for drafts: steps_per_call, within the spec_tokens + 1
    tokens a speculating call's pages are allocated for."""
    return min(self.steps_per_call, self.spec_tokens + 1)

  def draft_room(self, live_rows: int) -> int:
    """The most drafts one verify call may check for ``live_rows`` rows:
    each row's spec_tokens, but in a batch-invariant pool, whose verify
    runs every live row's current token and drafts as rows of one
    max_seqs-row decode step, what the live rows leave of it."""
    if self.batch_invariant:
      return max(self.max_seqs - live_rows, 0)
    return live_rows * self.spec_tokens


__all__ = ["DecodeConfig", "MIN_PROGRAM_ROWS"]
