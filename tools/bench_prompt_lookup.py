r"""Prompt lookup's host time per speculating decode call: the drafts of
``--rows`` rows of ``--context`` tokens each, one token appended to every
row between calls, as a decode replica asks for them.

Two ways (the same drafts, checked):
  rescan   each call rebuilds a row's prompt + output as a list and scans
           it (``speculative.propose_ngram``);
  index    each row keeps a ``speculative.PromptLookup``: the new token is
           appended, and a lookup compares packed n-gram keys.

Tokens are random (``--vocab``): an n-gram seldom recurs, so every n from
``--ngram`` down to 1 is searched, the most a lookup costs. No JAX, no
device: this is the engine thread's own work between calls.

  python tools/bench_prompt_lookup.py --rows=128 --context=8192
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags
import numpy as np

from pdjax.engine.speculative import PromptLookup, propose_ngram, token_bits

flags.DEFINE_integer("rows", 128, "Rows drafting in each call.")
flags.DEFINE_integer("context", 8192, "Tokens of each row (prompt).")
flags.DEFINE_integer("calls", 20, "Timed calls.")
flags.DEFINE_integer("spec_tokens", 4, "Tokens drafted per row.")
flags.DEFINE_integer("ngram", 3, "Longest n-gram looked up.")
flags.DEFINE_integer("vocab", 128256, "Token ids are drawn below this.")
flags.DEFINE_string("out", None, "JSON file of the figures.")
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  rng = np.random.default_rng(0)
  prompts = [tuple(rng.integers(0, FLAGS.vocab, FLAGS.context).tolist())
             for _ in range(FLAGS.rows)]
  generated = [[] for _ in prompts]
  lookups = [PromptLookup(p, len(p) + 64, max_n=FLAGS.ngram,
                          bits=token_bits(FLAGS.vocab)) for p in prompts]
  times = {"rescan": [], "index": []}
  for _ in range(FLAGS.calls):
    for g in generated:
      g.append(int(rng.integers(0, FLAGS.vocab)))
    t0 = time.perf_counter()
    want = [propose_ngram(list(p) + g, FLAGS.spec_tokens,
                          max_n=FLAGS.ngram)
            for p, g in zip(prompts, generated)]
    t1 = time.perf_counter()
    got = []
    for lookup, g in zip(lookups, generated):
      lookup.update(g)
      got.append(lookup.propose(FLAGS.spec_tokens))
    t2 = time.perf_counter()
    if got != want:
      raise AssertionError("the index's drafts differ from a rescan's")
    times["rescan"].append(t1 - t0)
    times["index"].append(t2 - t1)
  rec = {"rows": FLAGS.rows, "context": FLAGS.context,
         "spec_tokens": FLAGS.spec_tokens, "ngram": FLAGS.ngram,
         "vocab": FLAGS.vocab, "calls": FLAGS.calls}
  for way, ts in times.items():
    rec[f"{way}_ms_per_call"] = statistics.median(ts) * 1e3
  rec["speedup"] = rec["rescan_ms_per_call"] / rec["index_ms_per_call"]
  print(f"prompt lookup, {FLAGS.rows} rows x {FLAGS.context} tokens, "
        f"{FLAGS.ngram}-grams: rescan {rec['rescan_ms_per_call']:.2f} ms "
        f"per call, index {rec['index_ms_per_call']:.2f} ms "
        f"({rec['speedup']:.0f}x)")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(rec, f, indent=1)


if __name__ == "__main__":
  app.run(main)
