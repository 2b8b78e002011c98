"""``python -m pdjax.launch.decode``: a decode-pool worker (DP replicas; it
also prefills prompts under the router's local-prefill threshold)."""

from absl import app

from pdjax.launch import worker

if __name__ == "__main__":
  app.run(lambda argv: worker.run("decode"))
