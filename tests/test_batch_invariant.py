"""Batch-invariant decoding (``DecodeConfig.batch_invariant``), on CPU with
the tiny model.

On a GPU a decode row's bf16 arithmetic depends on the shape of the program
that runs it (cuBLAS, cuDNN and XLA choose kernels per shape), and so on the
rows decoded beside it; on the CPU it rarely does, so equal tokens there
would show nothing. The engine tests therefore decode with a stand-in
model whose logits depend on the program's shape as a GPU's may: the tiny
model's, plus a small offset drawn from the step's row count and page-table
width (``_shape_dependent``). Without the mode a stream's tokens then
change with the rows beside it; with it they do not, and speculation
(prompt lookup, a draft model) keeps plain decoding's tokens, bit for bit
with their logprobs. The verify pass itself is checked on the real model:
its logits at every kept position are those of the decode steps that would
run them, bit for bit, in float32 and bf16.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax import config as C
from pdjax.engine import decode_programs
from pdjax.engine.colocated import ColocatedEngine
from pdjax.engine.decode_config import DecodeConfig
from pdjax.engine.decode_programs import generate_compiler_options
from pdjax.engine.decode_replica import DecodeReplica
from pdjax.engine.prefill import PrefillConfig
from pdjax.engine.sampling import SamplingParams
from pdjax.model import llama

# One prompt per prefill program: a prompt's prefill (and so its first
# token and KV) does not depend on the prompts batched with it, which the
# mode does not cover.
PCFG = PrefillConfig(buckets=(16, 32), max_batch=1, page_size=16,
                     max_seq_len=64)
PLAIN = DecodeConfig(max_seqs=8, page_size=16, num_pages=40, max_seq_len=64,
                     steps_per_call=4)
INVARIANT = dataclasses.replace(PLAIN, batch_invariant=True)
# Verify calls whose live rows and drafts share the 8-row step: up to 2
# or 3 drafts a row, fewer where more rows run.
NGRAM = dataclasses.replace(INVARIANT, speculative="ngram", spec_tokens=2)
DRAFT = dataclasses.replace(INVARIANT, speculative="draft", spec_tokens=3)

# How far the stand-in's logits move with the program's shape (the tiny
# model's logits are O(1) apart at the top; this flips near ties).
WOBBLE = 0.3


# --------------------------------------------------------------- config
def test_one_program_shape_and_draft_room():
  assert PLAIN.row_counts == (8,) and PLAIN.widths == (1, 2, 4)
  assert INVARIANT.row_counts == (8,) and INVARIANT.widths == (4,)
  assert [INVARIANT.rows_for(n) for n in (1, 5, 8)] == [8, 8, 8]
  assert INVARIANT.width_for(1) == 4
  # A verify call's drafts take what its live rows leave of the step.
  assert [NGRAM.draft_room(n) for n in (1, 5, 8)] == [7, 3, 0]
  assert DRAFT.draft_room(2) == 6
  plain_ngram = dataclasses.replace(NGRAM, batch_invariant=False)
  assert [plain_ngram.draft_room(n) for n in (1, 8)] == [2, 16]
  # Buckets that name the one shape are allowed.
  DecodeConfig(max_seqs=8, max_seq_len=64, batch_invariant=True,
               row_buckets=(8,), table_buckets=(4,))


@pytest.mark.parametrize("settings, message", [
    (dict(row_buckets=(2,)), "row_buckets"),
    (dict(table_buckets=(2,)), "table_buckets"),
    (dict(attention="paged"), "attention='paged'"),
    (dict(speculative="ngram", spec_tokens=8), "spec_tokens must be below "
     "max_seqs"),
    (dict(speculative="draft", spec_tokens=9), "spec_tokens must be below "
     "max_seqs"),
])
def test_impossible_combinations_are_refused(settings, message):
  with pytest.raises(ValueError, match=message):
    DecodeConfig(max_seqs=8, max_seq_len=64, batch_invariant=True,
                 **settings)
  DecodeConfig(max_seqs=8, max_seq_len=64, **settings)   # fine without it


def test_deployment_key_and_flag(tmp_path):
  """``[decode] batch_invariant`` and ``--decode_batch_invariant`` reach
  the pool's DecodeConfig; an impossible combination in a file is refused
  when it is resolved."""
  from absl import flags

  from pdjax.launch import decode
  path = tmp_path / "d.toml"
  path.write_text("[decode]\nmax_seqs = 8\nbatch_invariant = true\n")
  assert C.resolve(path).decode_engine_config().batch_invariant
  fv = flags.FlagValues()
  cfg = decode.define_flags(fv)
  fv(["prog", f"--config={path}", "--nodecode_batch_invariant"])
  assert cfg.overrides() == {"decode": {"batch_invariant": False}}
  assert not cfg.resolve(log_it=False).decode_engine_config().batch_invariant
  path.write_text("[decode]\nmax_seqs = 4\nbatch_invariant = true\n"
                  "speculative = \"ngram\"\nspec_tokens = 4\n")
  with pytest.raises(ValueError, match="spec_tokens must be below"):
    C.resolve(path)


def test_gpu_programs_keep_the_plain_pools_kernel_options():
  """The mode fixes shapes, not kernels: its max_seqs-row program compiles
  with the options a plain pool's program of that row count has
  (autotuning on: off, an 8B step's rows depended on their neighbours on
  an H100)."""
  rows = INVARIANT.max_seqs
  assert generate_compiler_options(INVARIANT, "gpu") == (
      generate_compiler_options(PLAIN, "gpu", rows))
  assert "xla_gpu_autotune_level" not in generate_compiler_options(
      INVARIANT, "gpu")
  assert generate_compiler_options(INVARIANT, "cpu") is None


def test_attention_is_xlas_not_cudnns(tiny_decode_params, monkeypatch):
  """cuDNN's decode attention does not give the same bits run to run on a
  GPU, so a batch-invariant pool's step attends with XLA's over gathered
  pages. Here every attention that asks the backend's choice is told
  "cudnn", which the CPU cannot run: the pool's step still runs, a plain
  step does not; and on a GPU the pool never takes the paged kernel."""
  params, cfg, _, _ = tiny_decode_params
  monkeypatch.setattr(llama, "attention_impl", lambda dtype, hd: "cudnn")
  programs = decode_programs._Programs(cfg, INVARIANT, (), "cpu", 1)
  B, M, P = 2, 2, INVARIANT.page_size
  L, K, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  pool = jnp.zeros((L * (B * M + 1), P, K, hd), cfg.jnp_dtype)
  args = (params, jnp.array([5, 7], jnp.int32), jnp.array([3, 9], jnp.int32),
          pool, pool, jnp.array([[1, 2], [3, 4]], jnp.int32))
  out = programs._forward(*args, cfg=cfg, paged_attention=None)
  assert np.isfinite(np.asarray(out.logits, np.float32)).all()
  with pytest.raises(Exception, match="(?i)cudnn"):
    llama.decode_forward(*args, cfg=cfg)
  assert not decode_programs.use_paged_attention(cfg, INVARIANT, "gpu", 1)


# ----------------------------------------------------- the verify pass
@pytest.fixture(scope="module")
def bf16_params(tiny_model_dir):
  from pdjax.engine.setup import load_sharded
  from pdjax.sharding import ShardingRules, make_mesh
  rules = ShardingRules.load("decode_dp")
  mesh = make_mesh({"dp": 1}, jax.devices()[:1])
  params, cfg = load_sharded(tiny_model_dir, rules, mesh, dtype="bfloat16")
  return params, cfg, mesh, rules


@pytest.fixture(params=["float32", "bfloat16"])
def model(request, tiny_decode_params, bf16_params):
  return tiny_decode_params if request.param == "float32" else bf16_params


# (kept drafts per row, -1: a row not run; the step's rows; where each run
# row sits in the reference steps): two rows' tokens as 7 of 12 step rows,
# the others idle; three rows' 12 positions, of which the 6 kept fill a
# 6-row step, one row running none.
@pytest.mark.parametrize("kept, R, slots", [
    ((3, 2), 12, (3, 9)),
    ((3, -1, 1), 6, (2, None, 4)),
], ids=["padded", "packed"])
def test_verify_positions_are_decode_steps(model, kept, R, slots):
  """Rows' tokens at kept positions (up to 3 drafts each), as pseudo-rows
  of one R-row step: each kept position's logits and K/V are, bit for
  bit, those of the decode steps of an R-row program that run the row's
  tokens one by one beside another live row; positions past a row's kept
  ones, and a row that keeps none, write nothing of the row's."""
  params, cfg, _, _ = model
  L, K, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  P, N, M, T = 4, 24, 6, 4
  B = len(kept)
  rng = np.random.default_rng(0)
  pool = jnp.asarray(rng.normal(size=(L * N, P, K, hd)),
                     cfg.jnp_dtype)
  table = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12],
                    [15, 16, 17, 18, 19, 20]][:B], np.int32)
  start = np.array([5, 13, 9][:B], np.int32)
  tokens = rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32)
  kept = np.array(kept, np.int32)
  verify = jax.jit(functools.partial(llama.decode_tokens_as_steps, rows=R),
                   static_argnames="cfg")(
      params, jnp.asarray(tokens), jnp.asarray(start), pool, pool,
      jnp.asarray(table), cfg=cfg, num_kept=jnp.asarray(kept))
  step = jax.jit(llama.decode_forward, static_argnames=("cfg",
                                                       "paged_attention"))
  run = [(b, slot) for b, slot in enumerate(slots) if slot is not None]
  kp = vp = pool
  want = {}
  for t in range(T):
    tok, pos = np.zeros((R,), np.int32), np.zeros((R,), np.int32)
    tab = np.zeros((R, M), np.int32)
    tok[0], pos[0], tab[0, :2] = 7, 6, (13, 14)   # another live row
    for b, slot in run:
      if t <= kept[b]:
        tok[slot], pos[slot], tab[slot] = tokens[b, t], start[b] + t, table[b]
    out = step(params, jnp.asarray(tok), jnp.asarray(pos), kp, vp,
               jnp.asarray(tab), cfg=cfg)
    kp, vp = out.k_pool, out.v_pool
    for b, slot in run:
      want[b, t] = np.asarray(out.logits[slot])
  got = np.asarray(verify.logits)
  for b, _ in run:
    for t in range(kept[b] + 1):
      np.testing.assert_array_equal(got[b, t], want[b, t], f"{b}, {t}")
  # The rows' pages of every layer hold the same K/V: the kept positions',
  # and the pool's old values past them (all of them for a row run not).
  pages = (np.arange(L)[:, None] * N + table.reshape(1, -1)).reshape(-1)
  for mine, theirs in ((verify.k_pool, kp), (verify.v_pool, vp)):
    np.testing.assert_array_equal(np.asarray(mine[pages]),
                                  np.asarray(theirs[pages]))
  for b in range(B):
    nxt = start[b] + kept[b] + 1
    page = table[b, nxt // P]
    np.testing.assert_array_equal(np.asarray(verify.k_pool[page, nxt % P]),
                                  np.asarray(pool[page, nxt % P]))


def test_logprobs_as_steps_are_the_steps_sampler_s(model):
  """A verify pass's logprobs at kept positions, packed as the step ran
  them, are those the R-row step's sampler computes for its rows."""
  from pdjax.engine.sampling import token_logprobs
  _, cfg, _, _ = model
  B, T, R, V = 3, 4, 6, cfg.vocab_size
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(B, T, V)) * 4, jnp.float32)
  tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  kept = jnp.asarray([1, -1, 3], jnp.int32)
  got = np.asarray(decode_programs.logprobs_as_steps(logits, tokens, kept, R))
  rows = [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2), (2, 3)]
  step = np.asarray(token_logprobs(
      jnp.stack([logits[b, t] for b, t in rows]),
      jnp.stack([tokens[b, t] for b, t in rows])))
  for i, (b, t) in enumerate(rows):
    assert got[b, t].tobytes() == step[i].tobytes(), (b, t)


def test_drafts_that_do_not_fit_go_to_the_rows_that_waited_longest():
  """A batch-invariant pool's verify call of 5 live rows holds 3 drafts
  (8 step rows less 5): the rows whose drafts were verified least
  recently (then the oldest) take them first, each up to what it wants;
  a pool without the mode checks every row's drafts."""
  Row = collections.namedtuple("Row", "last_drafted arrival")
  replica = types.SimpleNamespace(
      dcfg=NGRAM,
      rows=[Row(7, 0), Row(3, 1), Row(0, 4), Row(3, 2), Row(9, 3)])
  rows, wanted = [0, 1, 2, 3, 4], [2, 2, 1, 2, 2]
  # Order: row 2 (never), row 1 (call 3, older), row 3, row 0, row 4.
  assert DecodeReplica._fit(replica, rows, 8, wanted).tolist() == [
      0, 2, 1, 0, 0, 0, 0, 0]
  assert DecodeReplica._fit(replica, rows[:2], 8, [2, 2]).tolist() == [
      2, 2, 0, 0, 0, 0, 0, 0]
  replica.dcfg = dataclasses.replace(NGRAM, batch_invariant=False)
  assert DecodeReplica._fit(replica, rows, 5, wanted).tolist() == wanted


# -------------------------------------------------------------- engines
def _shape_dependent(forward):
  """``forward`` (``llama.decode_forward``) whose logits move with the
  step's row count and page-table width, as kernels chosen per shape may
  round them, and not with any row's values."""
  def run(params, tokens, positions, k_pool, v_pool, table, *, cfg,
          **attention):
    out = forward(params, tokens, positions, k_pool, v_pool, table, cfg=cfg,
                  **attention)
    key = jax.random.key(1000 * tokens.shape[0] + table.shape[1])
    wobble = WOBBLE * jax.random.normal(key, out.logits.shape[-1:])
    return out._replace(logits=out.logits + wobble)
  return run


class _Shapes:
  """Records the (rows, page-table width) of every call a pool's
  programs run, what each verify call checks, and how many steps each
  plain call of a speculating pool runs."""

  def __init__(self, engine):
    programs = engine.decode.programs
    self.calls: list[tuple[int, int]] = []
    self.verified: list[int] = []
    self.plain_steps: list[int] = []
    for name in ("generate", "plain"):
      setattr(programs, name, self._wrap(getattr(programs, name), name))

  def _wrap(self, get, name):
    def program(all_greedy, rows, *steps):
      real = get(all_greedy, rows, *steps)
      if real is None:
        return None

      def run(params, state, slots, *drafts):
        self.calls.append(tuple(slots.page_table.shape))
        if drafts:   # (live rows, drafts checked, rows with drafts)
          num = np.asarray(drafts[1])
          self.verified.append((int(np.asarray(slots.active).sum()),
                                int(num.sum()), int(np.count_nonzero(num))))
        state, out = real(params, state, slots, *drafts)
        if name == "plain":   # out: [fields, steps, rows]
          self.plain_steps.append(out.shape[1])
        return state, out
      return run
    return program


def _engine(model, dcfg, monkeypatch, **kw):
  params, cfg, mesh, rules = model
  monkeypatch.setattr(decode_programs, "decode_forward",
                      _shape_dependent(llama.decode_forward))
  return ColocatedEngine(params, cfg, mesh, rules, PCFG, dcfg, **kw)


def _run(engine, requests):
  """Submits (rid, prompt, sampling) at once, drains; per request its
  tokens and logprobs."""
  tokens = collections.defaultdict(list)
  logprobs = collections.defaultdict(list)

  def callback(ev):
    tokens[ev.request_id].extend(ev.token_ids)
    logprobs[ev.request_id].extend(ev.logprobs)
  for rid, p, s in requests:
    engine.submit(rid, p, s, callback, seed_u32=s.seed_u32(0))
  engine.drain()
  u = engine.decode.kv_usage()
  assert u["rows_live"] == 0 and u["pages_used"] == 0, u
  return {rid: (tokens[rid], np.asarray(logprobs[rid], np.float32))
          for rid, _, _ in requests}


def _greedy(max_tokens):
  return SamplingParams(max_tokens=max_tokens, temperature=0.0,
                        ignore_eos=True)


def _alone_and_among_others():
  """A stream, and five others of other prompt and output lengths (rows
  come and go while it decodes, holding 1 to 4 pages)."""
  rng = np.random.default_rng(3)
  me = ("me", rng.integers(3, 300, 11).tolist(), _greedy(24))
  others = [(f"o{i}", rng.integers(3, 300, n).tolist(), _greedy(t))
            for i, (n, t) in enumerate([(5, 9), (30, 20), (17, 30), (8, 4),
                                        (25, 12)])]
  return me, others


def _same(a, b):
  """Tokens equal, logprobs bit for bit."""
  return a[0] == b[0] and a[1].tobytes() == b[1].tobytes()


@pytest.fixture(scope="module")
def invariant_plain(tiny_decode_params):
  """The batch-invariant plain pool's outputs (float32): the stream
  alone, among the others, and the speculation tests' requests."""
  with pytest.MonkeyPatch.context() as mp:
    engine = _engine(tiny_decode_params, INVARIANT, mp)
    shapes = _Shapes(engine)
    me, others = _alone_and_among_others()
    out = {"alone": _run(engine, [me]),
           "among": _run(engine, [me] + others),
           "speculation": _run(engine, _requests()),
           "shapes": set(shapes.calls)}
  return out


def test_a_stream_alone_and_among_others(invariant_plain):
  """The stream's tokens and logprobs alone are those among the others,
  bit for bit: every call ran the one program shape."""
  out = invariant_plain
  assert out["shapes"] == {(8, 4)}
  assert _same(out["alone"]["me"], out["among"]["me"])


def test_without_the_mode_shapes_and_tokens_vary(tiny_decode_params,
                                                 invariant_plain,
                                                 monkeypatch):
  """The same pool without the mode (and with a 2-row program beside the
  8-row one) runs the stream alone in 2-row programs and among the others
  in 8-row ones, with page tables as wide as each call needs, and the
  stand-in's tokens change with them: what the test above would see if the
  mode did not hold the shape."""
  engine = _engine(tiny_decode_params,
                   dataclasses.replace(PLAIN, row_buckets=(2,)), monkeypatch)
  shapes = _Shapes(engine)
  me, others = _alone_and_among_others()
  alone = _run(engine, [me])
  alone_shapes = set(shapes.calls)
  shapes.calls.clear()
  among = _run(engine, [me] + others)
  assert {rows for rows, _ in alone_shapes} == {2}
  assert {rows for rows, _ in shapes.calls} == {2, 8}
  assert len({width for _, width in shapes.calls}) > 1
  assert alone["me"][0] != among["me"][0]


def test_bf16_stream_alone_and_among_others(bf16_params, monkeypatch):
  engine = _engine(bf16_params, INVARIANT, monkeypatch)
  me, others = _alone_and_among_others()
  alone = _run(engine, [me])
  among = _run(engine, [me] + others)
  assert _same(alone["me"], among["me"])


def _requests():
  """Ten greedy requests (more than the pool's 8 rows, so rows are reused)
  of other prompt and output lengths; one opts out of speculation."""
  rng = np.random.default_rng(7)
  out = []
  for i, (n, t) in enumerate([(9, 30), (17, 12), (30, 25), (5, 40), (12, 7),
                              (20, 18), (3, 22), (26, 9), (14, 35), (7, 16)]):
    s = SamplingParams(max_tokens=t, temperature=0.0, ignore_eos=True,
                       speculative=(i != 4))
    out.append((f"r{i}", rng.integers(3, 300, n).tolist(), s))
  return out


def _oracle_lookup(want, vocab_size):
  """Prompt lookup replaced by drafts from the plain pool's tokens
  (``want``): a row's next k tokens, wrong from a position that varies by
  row and call, or none at all, so rows keep different numbers of drafts
  and some calls are plain steps (the tiny model's random weights repeat
  nothing for a real lookup to find)."""
  def lookup(replica, row, k):
    r = replica.rows[row]
    done = len(r.generated)
    rid = r.request.request_id
    upcoming = want[rid][0][done:done + k]
    h = zlib.crc32(f"{rid}/{done}".encode())
    if h % 4 == 0:
      return []
    right = h % (len(upcoming) + 1)
    wrong = [(t + 1) % vocab_size for t in upcoming[right:right + 1]]
    return upcoming[:right] + wrong
  return lookup


def test_prompt_lookup_keeps_plain_decodings_tokens(tiny_decode_params,
                                                    invariant_plain,
                                                    monkeypatch):
  """A batch-invariant pool drafting by prompt lookup: every stream's
  tokens and logprobs are the plain pool's, bit for bit (the stand-in
  moves logits per shape, so a verify pass of any other shape would part
  from them); each verify call's live rows and drafts fit its 8-row
  step, some held drafts of more rows than a verify of 3 positions a row
  could, and every call ran the one program shape."""
  want = invariant_plain["speculation"]
  monkeypatch.setattr(DecodeReplica, "_prompt_lookup", _oracle_lookup(
      want, tiny_decode_params[1].vocab_size))
  engine = _engine(tiny_decode_params, NGRAM, monkeypatch)
  shapes = _Shapes(engine)
  got = _run(engine, _requests())
  assert [rid for rid in want if not _same(got[rid], want[rid])] == []
  stats = engine.decode.stats
  assert 0 < stats["spec_accepted"] < stats["spec_drafted"], stats
  assert set(shapes.calls) == {(8, 4)}
  assert shapes.verified
  assert all(live + drafts <= 8 and drafts > 0
             for live, drafts, _ in shapes.verified)
  assert max(rows for _, _, rows in shapes.verified) > 8 // 3
  assert len(shapes.verified) < len(shapes.calls)   # plain steps too
  # One step where nothing was drafted; 3 (steps_per_call within k + 1)
  # while the 8 live rows leave no room.
  assert set(shapes.plain_steps) == {1, NGRAM.steps_without_room} == {1, 3}


def test_a_draft_model_keeps_plain_decodings_tokens(tiny_decode_params,
                                                    invariant_plain,
                                                    monkeypatch):
  """The same with the target as its own draft model: its drafts (the
  model without the stand-in's offsets, in programs of 2 rows) are mostly
  the target's tokens, and the verify keeps what it agrees with. While
  the 8 rows are all live they leave no room for drafts: those calls run
  plain steps, steps_per_call of them (within the 4 tokens a call's pages
  are allocated for)."""
  params, cfg, _, _ = tiny_decode_params
  engine = _engine(tiny_decode_params, DRAFT, monkeypatch,
                   draft=(params, cfg))
  shapes = _Shapes(engine)
  got = _run(engine, _requests())
  want = invariant_plain["speculation"]
  assert [rid for rid in want if not _same(got[rid], want[rid])] == []
  stats = engine.decode.stats
  assert 0 < stats["spec_accepted"] < stats["spec_drafted"], stats
  assert all(live + drafts <= 8 and drafts > 0
             for live, drafts, _ in shapes.verified)
  assert 0 < len(shapes.verified) < len(shapes.calls)
  assert DRAFT.steps_without_room == 4 and 4 in shapes.plain_steps
