"""``python -m pdjax.launch.prefill``: a prefill-pool worker (TP mesh)."""

from absl import app, flags

from pdjax.launch import flags as F
from pdjax.launch import worker


def define_flags(fv: flags.FlagValues = flags.FLAGS):
  return worker.define_flags(fv, "prefill")


if __name__ == "__main__":
  _CONFIG = F.define_for_main(define_flags)
  app.run(lambda argv: worker.run("prefill", _CONFIG))
