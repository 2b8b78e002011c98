"""Property-based tests of request validation and the KV allocator.

Hand-written cases check the inputs someone thought of; these let hypothesis
search for the ones nobody did (NaN temperatures, ids past int32, a control
character in a request id, an interleaving of reserve/lookup/evict that hands
a cached page out twice). Each property is stated against an independent
oracle or reference model, not against the code's own branches:

* validation: every client-controlled field either comes out satisfying the
  documented invariants, with defaults applied exactly when a field is
  absent, or is refused with an ``InvalidRequest`` naming an offending field;
  nothing else ever escapes (a stray TypeError would become INTERNAL instead
  of INVALID_ARGUMENT);
* ``BlockPool``: a rule-based state machine that drives the pool through
  random reserve/allocate/free/register/lookup/evict sequences and compares
  it, after every step, with a reference model (page states, reference
  counts, LRU order, what each page holds);
* ``LeaseTable``: with a fake clock, every lease is freed exactly once, by
  ``pop`` or by ``reap``, and ``reap`` frees only what is past its deadline;
* decode pages on demand: a replica's host side (admission, growth,
  preemption by swap or eviction, resumption, release) through random
  admissions, calls, finishes and cancels keeps every page owned once and
  each row's KV where its page table says, always advances its oldest
  row, and gives everything back.

The allocator machine found that a prefix ``lookup`` could revive a cached
page already promised to a reservation (reserved > free + cached, so the
reserved sequence would hit PoolExhausted mid-generation); the shrunk case
is kept below as a plain regression test.

Everything here is pure Python (no jax programs), so the whole file runs in
seconds; example counts are set to keep it well under 30 s.
"""

from __future__ import annotations

import collections
import math
import string
import types
import unicodedata

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule)

from pdjax.engine.block_pool import BlockPool, PoolExhausted
from pdjax.engine.requests import DecodeRequest, RequestStatus
from pdjax.engine.sampling import (MAX_STOP_TOKEN_IDS, InvalidRequest,
                                   SamplingArrays, SamplingParams)
from pdjax.service.validation import (DEFAULT_MAX_TOKENS, MAX_REQUEST_ID_LEN,
                                      MAX_TEXT_CHARS,
                                      check_prompt_ids, check_request_id,
                                      check_text, sampling_from_proto,
                                      sampling_to_proto)
from pdjax.transfer import base as transfer_base
from pdjax.transfer.base import LeaseTable
from pdjax.v1 import common_pb2

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT64_MAX = 2**64 - 1
F32_MAX = 3.4028234663852886e+38     # largest finite float32
F32_TINY = 1.401298464324817e-45    # smallest positive float32

# Pure-Python properties: no deadline (CI machines stall), modest counts.
FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# ============================================================== strategies
def _wide_ints(lo: int, hi: int) -> st.SearchStrategy[int]:
  """Integers in [lo, hi], biased towards the edges where bugs live: the
  type limits, zero, +-1, and small values."""
  edges = [v for v in (lo, lo + 1, -2, -1, 0, 1, 2, hi - 1, hi)
           if lo <= v <= hi]
  small_lo, small_hi = max(lo, -100), min(hi, 100)
  small = ([st.integers(small_lo, small_hi)] if small_lo <= small_hi else [])
  return st.one_of(st.sampled_from(edges), st.integers(lo, hi), *small)


# Any double: protobuf stores temperature/top_p as float32, so values past
# float32 range become inf and tiny ones 0 on assignment; both must still be
# handled by validation, so the wide range is the point.
_any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-45, 1.0000001, 0.9999999,
                     math.inf, -math.inf, math.nan, 3.4028235e38, 1e300]))

_vocab = st.integers(1, 5000)


def _stop_ids(vocab: int) -> st.SearchStrategy[list[int]]:
  """Stop-id lists of any length (past the cap too), inside and outside the
  vocabulary."""
  in_vocab = st.integers(0, vocab - 1)
  anywhere = _wide_ints(INT32_MIN, INT32_MAX)
  near = st.sampled_from([-1, vocab - 1, vocab, vocab + 1])
  return st.lists(st.one_of(in_vocab, anywhere, near),
                  max_size=MAX_STOP_TOKEN_IDS + 8)


@st.composite
def _proto_fields(draw):
  """(vocab_size, kwargs for the proto); absent optional fields are simply
  not in kwargs, so HasField is False for them."""
  vocab = draw(_vocab)
  kw = {}
  if draw(st.booleans()):
    kw["max_tokens"] = draw(_wide_ints(INT32_MIN, INT32_MAX))
  if draw(st.booleans()):
    kw["temperature"] = draw(_any_float)
  if draw(st.booleans()):
    kw["top_p"] = draw(_any_float)
  if draw(st.booleans()):
    kw["top_k"] = draw(_wide_ints(INT32_MIN, INT32_MAX))
  if draw(st.booleans()):
    kw["min_p"] = draw(_any_float)
  if draw(st.booleans()):
    kw["min_tokens"] = draw(_wide_ints(INT32_MIN, INT32_MAX))
  if draw(st.booleans()):
    kw["seed"] = draw(st.one_of(_wide_ints(0, UINT64_MAX),
                                st.sampled_from([2**63 - 1, 2**63])))
  if draw(st.booleans()):
    kw["stop_token_ids"] = draw(_stop_ids(vocab))
  if draw(st.booleans()):
    kw["ignore_eos"] = draw(st.booleans())
  if draw(st.booleans()):
    kw["speculative"] = draw(st.booleans())
  return vocab, kw


@st.composite
def _valid_proto_fields(draw):
  """Fields that satisfy every documented constraint, drawn explicitly (not
  filtered), so acceptance is asserted, not assumed."""
  vocab = draw(_vocab)
  kw = {}
  if draw(st.booleans()):
    kw["max_tokens"] = draw(st.integers(1, INT32_MAX))
  if draw(st.booleans()):
    kw["temperature"] = draw(st.floats(0.0, F32_MAX, width=32))
  if draw(st.booleans()):
    # (0, 1] in float32: the smallest positive float32 up to exactly 1.
    kw["top_p"] = draw(st.one_of(
        st.floats(F32_TINY, 1.0, width=32), st.just(1.0)))
  if draw(st.booleans()):
    kw["top_k"] = draw(st.integers(-1, INT32_MAX))
  if draw(st.booleans()):
    # [0, 1] in float32, both ends included.
    kw["min_p"] = draw(st.one_of(st.floats(0.0, 1.0, width=32),
                                 st.sampled_from([0.0, 1.0])))
  if draw(st.booleans()):
    # At most the request's max_tokens (16 when it is absent).
    kw["min_tokens"] = draw(st.integers(0, kw.get("max_tokens", 16)))
  if draw(st.booleans()):
    kw["seed"] = draw(st.integers(0, 2**63 - 1))
  if draw(st.booleans()):
    kw["stop_token_ids"] = draw(st.lists(st.integers(0, vocab - 1),
                                         max_size=MAX_STOP_TOKEN_IDS))
  if draw(st.booleans()):
    kw["ignore_eos"] = draw(st.booleans())
  if draw(st.booleans()):
    kw["speculative"] = draw(st.booleans())
  return vocab, kw


@st.composite
def _stop_ids_invalid(draw, vocab: int):
  """Either too many ids, or one outside the vocabulary among valid ones."""
  valid = st.integers(0, vocab - 1)
  if draw(st.booleans()):
    return draw(st.lists(valid, min_size=MAX_STOP_TOKEN_IDS + 1,
                         max_size=MAX_STOP_TOKEN_IDS + 8))
  ids = draw(st.lists(valid, max_size=MAX_STOP_TOKEN_IDS - 1))
  bad = draw(st.one_of(st.integers(INT32_MIN, -1),
                       st.integers(vocab, INT32_MAX),
                       st.sampled_from([-1, vocab])))
  ids.insert(draw(st.integers(0, len(ids))), bad)
  return ids


def _invalid_value(field: str, vocab: int) -> st.SearchStrategy:
  nonfinite = st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300])
  return {
      "max_tokens": _wide_ints(INT32_MIN, 0),
      "temperature": st.one_of(nonfinite,
                               st.floats(max_value=-F32_TINY, width=32)),
      # <= 0 (1e-50 rounds to 0 in float32), or just above 1 in float32.
      "top_p": st.one_of(nonfinite, st.floats(max_value=0.0, width=32),
                         st.sampled_from([1e-50, 1.0000001, 2.0]),
                         st.floats(min_value=1.0000001192092896, width=32)),
      "top_k": _wide_ints(INT32_MIN, -2),
      # < 0, or just above 1 in float32.
      "min_p": st.one_of(nonfinite, st.floats(max_value=-F32_TINY, width=32),
                         st.sampled_from([1.0000001, 2.0]),
                         st.floats(min_value=1.0000001192092896, width=32)),
      "min_tokens": _wide_ints(INT32_MIN, -1),
      "seed": _wide_ints(2**63, UINT64_MAX),
      "stop_token_ids": _stop_ids_invalid(vocab),
  }[field]


@st.composite
def _one_bad_field(draw):
  """A valid request with exactly one field broken: the refusal must name
  that field (with several broken, any of them will do, which could hide a
  check that is missing)."""
  vocab, kw = draw(_valid_proto_fields())
  field = draw(st.sampled_from(["max_tokens", "temperature", "top_p",
                                "top_k", "min_p", "min_tokens", "seed",
                                "stop_token_ids"]))
  kw[field] = draw(_invalid_value(field, vocab))
  return vocab, kw, field


def _offending_fields(p: common_pb2.SamplingParams, vocab: int) -> set[str]:
  """The oracle: which fields of ``p`` break a documented constraint. Read
  from the proto (after its float32/int32 conversion), written from the
  contract in SamplingParams and the proto comments, not from the code."""
  bad = set()
  if p.HasField("max_tokens") and p.max_tokens < 1:
    bad.add("sampling.max_tokens")
  if p.HasField("temperature") and not (math.isfinite(p.temperature)
                                        and p.temperature >= 0):
    bad.add("sampling.temperature")
  if p.HasField("top_p") and not (math.isfinite(p.top_p)
                                  and 0 < p.top_p <= 1):
    bad.add("sampling.top_p")
  if p.HasField("top_k") and p.top_k < -1:
    bad.add("sampling.top_k")
  if p.HasField("min_p") and not (math.isfinite(p.min_p)
                                  and 0 <= p.min_p <= 1):
    bad.add("sampling.min_p")
  # At most max_tokens: a relation, judged against a valid max_tokens only.
  max_tokens = p.max_tokens if p.HasField("max_tokens") else DEFAULT_MAX_TOKENS
  if p.HasField("min_tokens") and (
      p.min_tokens < 0 or 1 <= max_tokens < p.min_tokens):
    bad.add("sampling.min_tokens")
  if p.HasField("seed") and not 0 <= p.seed < 2**63:
    bad.add("sampling.seed")
  if len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(
      not 0 <= t < vocab for t in p.stop_token_ids):
    bad.add("sampling.stop_token_ids")
  return bad


def _assert_documented_invariants(s: SamplingParams, p, vocab: int) -> None:
  """What an engine may rely on for any SamplingParams validation let in."""
  assert isinstance(s.max_tokens, int) and s.max_tokens >= 1
  assert isinstance(s.temperature, float)
  assert math.isfinite(s.temperature) and s.temperature >= 0
  assert isinstance(s.top_p, float) and 0 < s.top_p <= 1
  assert isinstance(s.top_k, int) and s.top_k >= -1
  assert isinstance(s.min_p, float) and 0 <= s.min_p <= 1
  assert isinstance(s.min_tokens, int) and 0 <= s.min_tokens <= s.max_tokens
  assert s.seed is None or (isinstance(s.seed, int) and 0 <= s.seed < 2**63)
  assert isinstance(s.stop_token_ids, tuple)
  assert len(s.stop_token_ids) <= MAX_STOP_TOKEN_IDS
  assert all(isinstance(t, int) and 0 <= t < vocab for t in s.stop_token_ids)
  assert isinstance(s.ignore_eos, bool)
  # Defaults exactly when absent, the client's value exactly when present.
  assert s.max_tokens == (p.max_tokens if p.HasField("max_tokens")
                          else DEFAULT_MAX_TOKENS)
  assert s.temperature == (p.temperature if p.HasField("temperature")
                           else 1.0)
  assert s.top_p == (p.top_p if p.HasField("top_p") else 1.0)
  assert s.top_k == (p.top_k if p.HasField("top_k") else 0)
  assert s.min_p == (p.min_p if p.HasField("min_p") else 0.0)
  assert s.min_tokens == (p.min_tokens if p.HasField("min_tokens") else 0)
  assert s.seed == (p.seed if p.HasField("seed") else None)
  assert s.stop_token_ids == tuple(p.stop_token_ids)
  assert s.ignore_eos == p.ignore_eos
  # Absent: the pool's setting applies (the engine reads True).
  assert s.speculative == (p.speculative if p.HasField("speculative")
                           else True)
  # An accepted request's params must survive the engine's own check too
  # (the decode side calls validate again on what the router forwarded).
  s.validate(vocab)


# ============================================================ sampling params
@FAST
@given(_proto_fields())
def test_sampling_from_proto_accepts_valid_or_names_the_field(case):
  vocab, kw = case
  p = common_pb2.SamplingParams(**kw)
  bad = _offending_fields(p, vocab)
  if bad:
    with pytest.raises(InvalidRequest) as info:
      sampling_from_proto(p, vocab_size=vocab)
    assert info.value.field in bad, (info.value.field, bad)
    assert str(info.value).startswith(info.value.field + ": ")
    assert len(str(info.value)) > len(info.value.field) + 2  # says what to fix
  else:
    # Any exception here (InvalidRequest or otherwise) fails the test.
    s = sampling_from_proto(p, vocab_size=vocab)
    _assert_documented_invariants(s, p, vocab)


@FAST
@given(_one_bad_field())
def test_sampling_from_proto_names_the_one_bad_field(case):
  vocab, kw, field = case
  p = common_pb2.SamplingParams(**kw)
  assert _offending_fields(p, vocab) == {"sampling." + field}
  with pytest.raises(InvalidRequest) as info:
    sampling_from_proto(p, vocab_size=vocab)
  assert info.value.field == "sampling." + field


@FAST
@given(_valid_proto_fields())
def test_sampling_from_proto_never_refuses_a_valid_request(case):
  vocab, kw = case
  p = common_pb2.SamplingParams(**kw)
  assert not _offending_fields(p, vocab)  # the generator is right
  s = sampling_from_proto(p, vocab_size=vocab)
  _assert_documented_invariants(s, p, vocab)
  # The router forwards params as a proto: the round trip must be exact, or
  # the decode worker would sample with something the client did not ask.
  again = sampling_from_proto(sampling_to_proto(s), vocab_size=vocab)
  assert again == s


def test_sampling_from_proto_defaults_for_an_empty_message():
  s = sampling_from_proto(common_pb2.SamplingParams(), vocab_size=10)
  assert s == SamplingParams(max_tokens=DEFAULT_MAX_TOKENS, temperature=1.0,
                             top_p=1.0, top_k=0, seed=None,
                             stop_token_ids=(), ignore_eos=False)


# ================================================================ prompt ids
_token_lists = st.lists(
    st.one_of(st.integers(), st.integers(-3, 3), st.integers(0, 5000),
              st.sampled_from([2**31, 2**63, -(2**63), 10**30])),
    max_size=40)


@FAST
@given(_token_lists, _vocab, st.integers(1, 40),
       st.sampled_from(["prompt_token_ids", "messages[0].token_ids"]))
def test_check_prompt_ids_accepts_valid_or_names_the_field(ids, vocab, max_len,
                                                           field):
  ok = 1 <= len(ids) <= max_len and all(0 <= t < vocab for t in ids)
  if ok:
    out = check_prompt_ids(ids, vocab_size=vocab, max_prompt_len=max_len,
                           field=field)
    assert out == ids and all(type(t) is int for t in out)
  else:
    with pytest.raises(InvalidRequest) as info:
      check_prompt_ids(ids, vocab_size=vocab, max_prompt_len=max_len,
                       field=field)
    assert info.value.field == field


@FAST
@given(st.data(), _vocab, st.integers(1, 64))
def test_check_prompt_ids_never_refuses_a_valid_prompt(data, vocab, max_len):
  ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1,
                           max_size=max_len))
  assert check_prompt_ids(tuple(ids), vocab_size=vocab,
                          max_prompt_len=max_len) == ids


def test_check_prompt_ids_can_keep_a_proto_field_whole():
  """``as_list=False`` gives back the repeated field itself once it passes
  (the router puts it in the workers' messages whole); the checks are the
  same."""
  from pdjax.v1 import generate_pb2
  req = generate_pb2.GenerateRequest()
  req.token_ids.ids.extend([5, 0, 9])
  ids = req.token_ids.ids
  assert check_prompt_ids(ids, vocab_size=10, max_prompt_len=3,
                          as_list=False) is ids
  assert check_prompt_ids(ids, vocab_size=10, max_prompt_len=3) == [5, 0, 9]
  req.token_ids.ids.append(10)
  with pytest.raises(InvalidRequest, match="10"):
    check_prompt_ids(ids, vocab_size=10, max_prompt_len=4, as_list=False)
  with pytest.raises(InvalidRequest, match="4 tokens"):
    check_prompt_ids(ids, vocab_size=11, max_prompt_len=3, as_list=False)


# ====================================================================== text
@FAST
@given(st.text(alphabet=st.characters(codec=None), max_size=200))
def test_check_text_accepts_any_nonempty_text(text):
  if text:
    assert check_text(text) is text
  else:
    with pytest.raises(InvalidRequest) as info:
      check_text(text)
    assert info.value.field == "text"


@settings(max_examples=12, deadline=None)
@given(st.integers(-2, 2), st.characters())
def test_check_text_length_limit(offset, ch):
  """Around the cap, built directly (hypothesis would not draw 4M chars)."""
  text = ch * (MAX_TEXT_CHARS + offset)
  if offset <= 0:
    assert check_text(text) is text
  else:
    with pytest.raises(InvalidRequest) as info:
      check_text(text)
    assert info.value.field == "text"


# ================================================================ request id
# Python's definition of printable, restated by category, so the oracle is
# not ``str.isprintable`` itself: request ids end up in logs and metrics
# labels, where a newline or an escape sequence is an injection.
_NON_PRINTABLE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}


def _printable(s: str) -> bool:
  return all(c == " " or unicodedata.category(c)
             not in _NON_PRINTABLE_CATEGORIES for c in s)


_request_ids = st.one_of(
    st.text(alphabet=st.characters(codec=None),
            max_size=MAX_REQUEST_ID_LEN + 20),
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zl", "Zp", "Zs"]),
            max_size=5),
    st.integers(MAX_REQUEST_ID_LEN - 2, MAX_REQUEST_ID_LEN + 2).map(
        lambda n: "r" * n),
    st.sampled_from(["", " ", "a\nb", "a\x1b[2Jb", "\u2028", "id\x00",
                     "\u200b", "req-1"]))


@FAST
@given(_request_ids)
def test_check_request_id_accepts_valid_or_refuses(request_id):
  ok = len(request_id) <= MAX_REQUEST_ID_LEN and _printable(request_id)
  if not ok:
    with pytest.raises(InvalidRequest) as info:
      check_request_id(request_id)
    assert info.value.field == "request_id"
    return
  out = check_request_id(request_id)
  if request_id:
    assert out == request_id
  else:
    # An empty id gets a generated one: unique enough, and itself valid.
    assert len(out) == 16 and all(c in string.hexdigits for c in out)
    assert check_request_id(out) == out


@FAST
@given(st.text(alphabet=string.ascii_letters + string.digits + "-_.:/ ",
               max_size=MAX_REQUEST_ID_LEN))
def test_check_request_id_never_refuses_a_valid_id(request_id):
  out = check_request_id(request_id)
  assert out == request_id or (not request_id and len(out) == 16)


# ========================================================== KV allocator
_HASHES = "abcd"   # a small alphabet, so registrations collide often


class BlockPoolMachine(RuleBasedStateMachine):
  """Drives a BlockPool and a reference model side by side.

  The model is the pool's documented contract: each page free, in use or
  cached; allocation takes free pages first, then cached ones least recently
  used first (forgetting their content name); a lookup hit takes a
  reference; ``available`` = free + cached - reserved. The test also plays
  the sequences that own pages: it writes a fresh content tag into every
  page it allocates and checks that a lookup hit returns a page still
  holding what was registered under that hash (a page reused while
  referenced or named would fail this).
  """

  def __init__(self):
    super().__init__()
    self.pool: BlockPool | None = None

  @initialize(num_pages=st.integers(2, 10))
  def init_pool(self, num_pages):
    self.pool = BlockPool(num_pages)
    self.n = num_pages
    self.free_set = set(range(1, num_pages))
    self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()
    self.ref = [0] * num_pages
    self.hash_of: dict[int, str] = {}
    self.page_of: dict[str, int] = {}
    self.reservations: list[int] = []   # each one held by some "sequence"
    self.held: list[int] = []           # one entry per reference we own
    self.content: dict[int, int] = {}   # page -> tag last written into it
    self.tag_of_hash: dict[str, int] = {}
    self.next_tag = 0

  # ------------------------------------------------------------ helpers
  @property
  def m_reserved(self) -> int:
    return sum(self.reservations)

  @property
  def m_available(self) -> int:
    return len(self.free_set) + len(self.lru) - self.m_reserved

  def _snapshot(self):
    p = self.pool
    return (p.num_free, p.num_cached, p.num_used, p.reserved, p.available,
            tuple(p.ref_count(i) for i in range(self.n)),
            tuple(p.contains(h) for h in _HASHES), p.stats["evictions"])

  def _forget(self, page: int) -> None:
    h = self.hash_of.pop(page, None)
    if h is not None:
      del self.page_of[h]
      del self.tag_of_hash[h]

  def _take(self, pages: list[int], n: int) -> None:
    """Checks an allocation of n pages against the model and applies it."""
    assert len(pages) == n
    assert len(set(pages)) == n, f"a page handed out twice in one call: {pages}"
    assert 0 not in pages, "the null page was handed out"
    for page in pages:
      assert page not in self.held, f"page {page} handed out while held"
      assert self.ref[page] == 0
    from_free = min(n, len(self.free_set))
    assert set(pages[:from_free]) <= self.free_set, (
        "cached pages were evicted while free ones were left")
    oldest = list(self.lru)[:n - from_free]
    assert pages[from_free:] == oldest, "eviction is not least recently used"
    for page in pages[:from_free]:
      self.free_set.remove(page)
    for page in pages[from_free:]:
      del self.lru[page]
      self._forget(page)
    for page in pages:
      self.ref[page] = 1
      self.held.append(page)
      self.content[page] = self.next_tag   # the sequence writes its KV
      self.next_tag += 1

  def _release(self, page: int) -> None:
    self.held.remove(page)
    self.ref[page] -= 1
    if self.ref[page] == 0:
      if page in self.hash_of:
        self.lru[page] = None
      else:
        self.free_set.add(page)

  # -------------------------------------------------------------- rules
  @precondition(lambda self: self.pool is not None)
  @rule(n=st.integers(0, 11))
  def reserve(self, n):
    expected = n <= self.m_available
    before = self._snapshot()
    assert self.pool.reserve(n) == expected
    if expected:
      self.reservations.append(n)
    else:
      assert self._snapshot() == before, "a refused reserve changed the pool"

  @precondition(lambda self: self.pool is not None)
  @rule(short=st.integers(0, 2))
  def reserve_the_rest(self, short):
    """Admission under load promises (nearly) everything left: the state
    in which taking a cached page would break a promise."""
    self.reserve(max(self.m_available - short, 0))

  @precondition(lambda self: self.pool is not None and self.reservations)
  @rule(i=st.integers(0, 100))
  def unreserve(self, i):
    n = self.reservations.pop(i % len(self.reservations))
    self.pool.unreserve(n)

  @precondition(lambda self: self.pool is not None and self.reservations)
  @rule(i=st.integers(0, 100), data=st.data())
  def allocate_reserved(self, i, data):
    """A sequence draws k pages of its reservation; the rest stays held."""
    r = self.reservations.pop(i % len(self.reservations))
    k = data.draw(st.integers(0, r), label="k")
    pages = self.pool.allocate(k, reserved=True)
    if r - k:
      self.reservations.append(r - k)
    self._take(pages, k)

  @precondition(lambda self: self.pool is not None)
  @rule(n=st.integers(0, 11))
  def allocate(self, n):
    if n > self.m_available:
      before = self._snapshot()
      with pytest.raises(PoolExhausted):
        self.pool.allocate(n)
      assert self._snapshot() == before, "a refused allocate changed the pool"
      return
    self._take(self.pool.allocate(n), n)

  @precondition(lambda self: self.pool is not None)
  @rule(extra=st.integers(1, 3))
  def allocate_too_many(self, extra):
    """Beyond availability (reservations of others count): refused, and
    the pool is exactly as before."""
    n = max(self.m_available, 0) + extra
    before = self._snapshot()
    with pytest.raises(PoolExhausted):
      self.pool.allocate(n)
    assert self._snapshot() == before

  @precondition(lambda self: self.pool is not None and self.held)
  @rule(picks=st.lists(st.integers(0, 100), min_size=1, max_size=6,
                       unique=True))
  def free(self, picks):
    idx = sorted({i % len(self.held) for i in picks})
    pages = [self.held[i] for i in idx]
    self.pool.free(pages)
    for page in pages:
      self._release(page)

  @precondition(lambda self: self.pool is not None and self.held)
  @rule(i=st.integers(0, 100), h=st.sampled_from(_HASHES),
        swap=st.booleans())
  def register(self, i, h, swap):
    page = self.held[i % len(self.held)]
    if h in self.page_of:
      expected = self.page_of[h]
    elif page in self.hash_of:
      expected = page    # already named by its own content: unchanged
    else:
      expected = page
      self.hash_of[page] = h
      self.page_of[h] = page
      self.tag_of_hash[h] = self.content[page]
    assert self.pool.register(page, h) == expected
    if swap and expected != page and self._lookup(h) is not None:
      # What a sequence does when another page already has its content:
      # take a reference to that one and drop its own.
      self.pool.free([page])
      self._release(page)

  @precondition(lambda self: self.pool is not None and self.held)
  @rule(i=st.integers(0, 100), h=st.sampled_from(_HASHES))
  def finish_and_cache(self, i, h):
    """A sequence ends as the decode engine's ``release`` ends it: its page
    is named by its content, then dropped (cached if nobody else holds
    it)."""
    page = self.held[i % len(self.held)]
    self.register(i % len(self.held), h, swap=False)
    self.pool.free([page])
    self._release(page)

  @precondition(lambda self: self.pool is not None)
  @rule(h=st.sampled_from(_HASHES))
  def lookup(self, h):
    self._lookup(h)

  def _lookup(self, h: str) -> int | None:
    expected = self.page_of.get(h)
    if (expected is not None and self.ref[expected] == 0
        and self.m_available < 1):
      # Reviving a cached page uses one page of availability; when every
      # page is promised to a reservation, the hit must be a miss, or a
      # reserved sequence would later find the pool empty.
      expected = None
    got = self.pool.lookup(h)
    assert got == expected
    if got is None:
      return None
    assert got != 0
    assert self.content[got] == self.tag_of_hash[h], (
        f"lookup({h!r}) returned page {got}, whose content was overwritten")
    if self.ref[got] == 0:
      del self.lru[got]
    self.ref[got] += 1
    self.held.append(got)
    return got

  @precondition(lambda self: self.pool is not None)
  @rule()
  def evict_all(self):
    expected = len(self.lru)
    assert self.pool.evict_all() == expected
    for page in list(self.lru):
      self._forget(page)
      self.free_set.add(page)
    self.lru.clear()
    # Pages still referenced keep their names: they were not evicted.
    for page in self.hash_of:
      assert self.ref[page] > 0

  @precondition(lambda self: self.pool is not None)
  @rule()
  def release_everything(self):
    """Every sequence finishes: nothing may be left in use or reserved
    (the soak test's "every allocation back to zero", in miniature)."""
    self.pool.free(list(self.held))
    for page in list(self.held):
      self._release(page)
    for n in self.reservations:
      self.pool.unreserve(n)
    self.reservations.clear()
    assert self.pool.num_used == 0 and self.pool.reserved == 0
    assert self.pool.num_free + self.pool.num_cached == self.pool.capacity

  # --------------------------------------------------------- invariants
  @invariant()
  def pool_matches_model(self):
    if self.pool is None:
      return
    p = self.pool
    p.check_invariants()
    assert p.available == p.num_free + p.num_cached - p.reserved
    # Every reservation can still be honoured in full.
    assert p.available >= 0, "a reservation was broken"
    assert p.available == self.m_available
    assert p.reserved == self.m_reserved
    assert p.num_free == len(self.free_set)
    assert p.num_cached == len(self.lru)
    assert p.ref_count(0) == 0
    counts = collections.Counter(self.held)
    for page in range(1, self.n):
      assert p.ref_count(page) == self.ref[page] == counts[page], page
    for h in _HASHES:
      assert p.contains(h) == (h in self.page_of)


def test_lookup_does_not_take_a_page_promised_to_a_reservation():
  """The sequence hypothesis found (shrunk): a cached page counted in
  ``available`` is reserved by one request, then revived by another's prefix
  lookup, leaving reserved > free + cached, so the first request's
  ``allocate(reserved=True)`` would raise PoolExhausted mid-generation."""
  pool = BlockPool(9)                    # 8 usable pages
  a, _ = pool.allocate(2)
  pool.register(a, "h")
  pool.free([a])                         # cached: 6 free + 1 cached
  assert pool.available == 7 and pool.reserve(7)
  assert pool.available == 0
  assert pool.lookup("h") is None        # promised: a miss, not a hit
  pool.check_invariants()
  got = pool.allocate(7, reserved=True)  # the promise holds
  assert len(got) == 7 and a in got and pool.reserved == 0
  pool.check_invariants()


BlockPoolMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestBlockPool = BlockPoolMachine.TestCase


# ==================================================== decode pages on demand
class _FakeSwap:
  """``SwapSpace``'s contract without device copies: the content tags of
  the pages each row swapped out, written back into the pages it gets."""

  def __init__(self, capacity: int, content: dict[int, tuple]):
    self.capacity_pages = capacity
    self.content = content
    self.rows: dict[int, list[tuple]] = {}
    self.used = 0

  def fits(self, n: int) -> bool:
    return self.used + n <= self.capacity_pages

  def held(self, key: int) -> int:
    return len(self.rows.get(key, ()))

  def swap_out(self, key: int, pages) -> None:
    assert key not in self.rows and self.fits(len(pages))
    self.rows[key] = [self.content[p] for p in pages]
    self.used += len(pages)

  def swap_in(self, key: int, pages) -> None:
    tags = self.rows.pop(key)
    assert len(tags) == len(pages)
    self.used -= len(tags)
    for page, tag in zip(pages, tags):
      self.content[page] = tag

  def drop(self, key: int) -> None:
    self.used -= len(self.rows.pop(key, ()))

  def land(self) -> None:
    pass


class DecodePagingMachine(RuleBasedStateMachine):
  """A decode replica's host side (``DecodeReplica``: admission, growth,
  preemption by swap or eviction, resumption, release) through random
  admissions, calls, finishes and cancels, with the device played by the
  test: every page a row gets is tagged (row, index), and the tags must
  stay where the row's page table says they are (swapped out and back
  included). After every step: the pool's pages are each owned once, by
  rows that cover their dispatched steps; swapped rows hold no pages and
  the swap space exactly their KV; a call advances some row whenever any
  wants steps (the oldest always gets its pages); and at the end every
  page and swapped page is back."""

  def __init__(self):
    super().__init__()
    self.rep = None

  @initialize(num_pages=st.integers(5, 16), max_seqs=st.integers(1, 6),
              steps=st.integers(1, 3), swap=st.integers(0, 12),
              watermark=st.sampled_from([0.0, 0.1]))
  def init_replica(self, num_pages, max_seqs, steps, swap, watermark):
    import itertools

    import numpy as np

    from pdjax.engine.decode_config import DecodeConfig
    from pdjax.engine.decode_replica import DecodeReplica
    self.dcfg = DecodeConfig(max_seqs=max_seqs, page_size=4,
                             num_pages=num_pages, max_seq_len=16,
                             steps_per_call=steps, swap_pages=swap,
                             admission_watermark=watermark)
    rep = object.__new__(DecodeReplica)   # no device state: host side only
    rep.dcfg, rep.pool = self.dcfg, BlockPool(num_pages)
    rep.fingerprint = rep.host_tier = rep.draft = None
    self.content: dict[int, tuple] = {}
    rep.swap = _FakeSwap(swap, self.content) if swap else None
    rep._arrivals, rep._evicted = itertools.count(), []
    rep.stats = collections.Counter()
    rep.rows = [None] * max_seqs
    rep.page_table = np.zeros((max_seqs, self.dcfg.pages_per_seq), np.int32)
    rep.active = np.zeros((max_seqs,), bool)
    rep.samp = SamplingArrays.empty(max_seqs)
    rep.max_tokens = np.ones((max_seqs,), np.int32)
    rep._slots_dirty = True
    self.rep = rep
    self.next_id = 0

  def _tag_new_pages(self, row: int, r, known: int) -> None:
    for i in range(known, len(r.pages)):
      self.content[r.pages[i]] = (r.request.request_id, i)

  @rule(reqs=st.lists(st.tuples(st.integers(1, 14), st.integers(1, 40)),
                      min_size=1, max_size=6))
  def admit_some(self, reqs):
    for prompt_len, max_tokens in reqs:
      self.admit(prompt_len, max_tokens)

  def admit(self, prompt_len, max_tokens):
    """``DecodeEngine.reserve`` then ``insert``'s host side."""
    from pdjax.engine.decode_replica import _Row
    rep = self.rep
    steps_needed = min(max_tokens - 1, self.dcfg.max_seq_len - prompt_len - 1)
    if None not in rep.rows or rep.num_swapped or steps_needed <= 0:
      return
    n = rep.admission_pages(prompt_len, max_tokens)
    if rep.pool.available - n < rep.headroom() or not rep.pool.reserve(n):
      return
    row = rep.rows.index(None)
    rid = f"q{self.next_id}"
    self.next_id += 1
    req = DecodeRequest(rid, [3] * prompt_len, 0, 0.0, None,
                        SamplingParams(max_tokens=max_tokens), 0, None)
    req.lifecycle.advance(RequestStatus.RUNNING)   # ``insert``'s move
    r = _Row(req, rep.pool.allocate(n, reserved=True), reserved_left=0,
             steps_needed=steps_needed, arrival=next(rep._arrivals),
             generated=[0])
    rep.rows[row] = r
    rep.page_table[row, :n] = r.pages
    self._tag_new_pages(row, r, 0)

  @rule(calls=st.integers(1, 12))
  def calls(self, calls):
    for _ in range(calls):
      self.call()

  @rule(prompt_len=st.integers(1, 8), calls=st.integers(4, 24))
  def fill_and_run(self, prompt_len, calls):
    """Long requests admitted until admission refuses, then calls: the
    rows outgrow the pool, so rows are preempted and resumed."""
    for _ in range(self.dcfg.max_seqs):
      self.admit(prompt_len, 40)
    for _ in range(calls):
      self.call()

  def call(self):
    """One dispatch's host side, then the delivery of rows that reached
    their length (they are released)."""
    rep = self.rep
    if rep.swap is not None:
      idle = not any(r is not None and not r.swapped for r in rep.rows)
      swapped = rep.num_swapped
      rep._resume_swapped()
      if idle and swapped:
        assert rep.num_swapped < swapped, "swapped rows never come back"
    before = {i: len(r.pages) for i, r in enumerate(rep.rows)
              if r is not None}
    wanted = rep._rows_to_advance()
    granted = rep._grow(wanted)
    if wanted:
      assert granted, "no row advanced though some wanted steps"
    for i, r in enumerate(rep.rows):
      if r is not None and not r.swapped:
        self._tag_new_pages(i, r, min(before.get(i, 0), len(r.pages)))
    for req in rep.evicted():   # to be recomputed: they hold nothing
      assert req.request_id not in {r.request.request_id for r in rep.rows
                                    if r is not None}
      assert req.prompt_ids[:1] == [3] and req.tokens_generated == 1
      assert req.lifecycle.status is RequestStatus.PREEMPTED_RECOMPUTE
    for i, r in enumerate(rep.rows):
      if r is not None and not r.swapped and not r.wants_steps:
        rep.release(i, RequestStatus.FINISHED_LENGTH)

  @rule(data=st.data(), often=st.integers(0, 3))
  def cancel(self, data, often):
    """A cancel (a quarter of the time, so rows live long enough to fill
    the pool)."""
    live = [i for i, r in enumerate(self.rep.rows) if r is not None]
    if live and not often:
      self.rep.release(data.draw(st.sampled_from(live)),
                       RequestStatus.FINISHED_ABORTED)

  def teardown(self):
    if self.rep is None:
      return
    for i in range(len(self.rep.rows)):
      self.rep.release(i, RequestStatus.FINISHED_ABORTED)
    p = self.rep.pool
    p.check_invariants()
    assert p.num_used == 0 and p.reserved == 0
    assert self.rep.swap is None or self.rep.swap.used == 0

  @invariant()
  def pages_are_owned_once_and_hold_their_rows_kv(self):
    if self.rep is None:
      return
    rep, P = self.rep, self.dcfg.page_size
    rep.pool.check_invariants()
    assert rep.pool.reserved == 0
    owned = [p for r in rep.rows if r is not None for p in r.pages]
    assert len(owned) == len(set(owned)) == rep.pool.num_used
    assert 0 not in owned
    swapped = 0
    for i, r in enumerate(rep.rows):
      if r is None:
        continue
      # A held row's request is live in it: running, or swapped out.
      assert r.status in (RequestStatus.RUNNING,
                          RequestStatus.PREEMPTED_SWAPPED)
      if r.swapped:
        assert not r.pages and rep.swap.held(i) > 0
        swapped += rep.swap.held(i)
        continue
      assert len(r.pages) >= math.ceil(
          (len(r.request.prompt_ids) + r.steps_dispatched) / P)
      assert list(rep.page_table[i, :len(r.pages)]) == r.pages
      for k, page in enumerate(r.pages):
        assert self.content[page] == (r.request.request_id, k)
    if rep.swap is not None:
      assert rep.swap.used == swapped
      assert set(rep.swap.rows) == {i for i, r in enumerate(rep.rows)
                                    if r is not None and r.swapped}


DecodePagingMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestDecodePaging = DecodePagingMachine.TestCase


# ============================================================== lease table
class _FakeClock:

  def __init__(self):
    self.now = 1000.0

  def monotonic(self) -> float:
    return self.now


_lease_ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 1 << 20)),
    st.tuples(st.just("pop"), st.integers(0, 100)),
    st.tuples(st.just("get"), st.integers(0, 100)),
    st.tuples(st.just("advance"), st.floats(0, 30)),
    st.tuples(st.just("reap"), st.just(0))), max_size=60)


@FAST
@given(st.sampled_from([0.0, 0.5, 5.0, 10.0]), _lease_ops)
def test_lease_table_frees_every_lease_exactly_once(ttl, ops):
  clock = _FakeClock()
  freed = collections.Counter()
  freed_value = {}

  def on_free(key, value):
    freed[key] += 1
    freed_value[key] = value

  with pytest.MonkeyPatch.context() as mp:
    # Only base.py's view of the clock: hypothesis and logging keep theirs.
    mp.setattr(transfer_base, "time",
               types.SimpleNamespace(monotonic=clock.monotonic))
    table = LeaseTable(ttl, on_free=on_free)
    live: dict[str, tuple[object, float, int]] = {}
    values: dict[str, object] = {}
    reaped = 0
    for op, arg in ops:
      if op == "put":
        key = f"t{len(values)}"    # transfer ids are unique
        value, nbytes = object(), arg
        table.put(key, value, nbytes)
        values[key] = value
        live[key] = (value, clock.now + ttl, nbytes)
      elif op in ("pop", "get"):
        # A key put earlier (live or already freed) or one never issued.
        keys = list(values) + ["never-issued"]
        key = keys[arg % len(keys)]
        want = live[key][0] if key in live else None
        if op == "get":
          assert table.get(key) is want
          assert freed[key] == (key in values and key not in live)
        else:
          assert table.pop(key) is want
          live.pop(key, None)
      elif op == "advance":
        clock.now += arg
      else:
        due = {k for k, (_, deadline, _) in live.items()
               if deadline < clock.now}
        before = dict(freed)
        assert table.reap() == len(due)
        reaped += len(due)
        for k in due:
          del live[k]
        newly = {k for k in freed if freed[k] != before.get(k, 0)}
        assert newly == due, "reap freed something not past its deadline"
      assert len(table) == len(live)
      assert table.nbytes == sum(nb for _, _, nb in live.values())
      for k in values:
        assert freed[k] == (0 if k in live else 1), k
    assert table.expired == reaped

    # Every lease is eventually freed: past every deadline, reap takes the
    # rest, each once, with the value it was put with.
    clock.now += ttl + 1
    assert table.reap() == len(live)
    assert len(table) == 0 and table.nbytes == 0
    assert set(freed) == set(values)
    assert all(n == 1 for n in freed.values())
    assert all(freed_value[k] is values[k] for k in values)


def test_lease_table_reap_is_strictly_after_the_deadline():
  clock = _FakeClock()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(transfer_base, "time",
               types.SimpleNamespace(monotonic=clock.monotonic))
    freed = []
    table = LeaseTable(5.0, on_free=lambda k, v: freed.append(k))
    table.put("a", 1)
    clock.now += 5.0          # exactly at the deadline: still held
    assert table.reap() == 0 and table.get("a") == 1
    clock.now += 1e-6
    assert table.reap() == 1 and freed == ["a"]
    assert table.pop("a") is None and freed == ["a"]  # not freed twice


def test_lease_table_put_over_a_live_key_frees_the_old_value():
  freed = []
  table = LeaseTable(60.0, on_free=lambda k, v: freed.append(v))
  table.put("t", "first")
  table.put("t", "second")
  table.pop("t")
  assert sorted(freed) == ["first", "second"]
