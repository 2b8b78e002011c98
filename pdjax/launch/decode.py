"""``python -m pdjax.launch.decode``: a decode-pool worker (DP replicas; it
also prefills prompts under the router's local-prefill threshold)."""

from absl import app, flags

from pdjax.launch import flags as F
from pdjax.launch import worker


def define_flags(fv: flags.FlagValues = flags.FLAGS):
  return worker.define_flags(fv, "decode")


if __name__ == "__main__":
  _CONFIG = F.define_for_main(define_flags)
  app.run(lambda argv: worker.run("decode", _CONFIG))
