"""``python -m pdjax.launch.prefill``: a prefill-pool worker (TP mesh)."""

from absl import app

from pdjax.launch import worker

if __name__ == "__main__":
  app.run(lambda argv: worker.run("prefill"))
