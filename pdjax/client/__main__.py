"""Command-line client: one completion (or the model info) from a router.

Examples:
  python -m pdjax.client --prompt="The capital of France is" --max_tokens=16
  python -m pdjax.client --prompt_token_ids=1,450,7483 --temperature=0 --json
  python -m pdjax.client --target=router:443 --tls_ca=ca.pem --token=$TOKEN \
      --info --wait_ready_s=60

The generated text goes to stdout (streamed as it arrives unless
--nostream); a one-line usage summary goes to stderr, so stdout can be piped.
With --json, stdout holds only the full result as one JSON object. Exit
status: 0 on success, 1 when an RPC fails (its status code is printed) or on
bad flags, 130 on Ctrl-C (the request is cancelled on the server).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from absl import app, flags

from pdjax.client import Client, GenerationError, GenerationResult, TlsConfig
from pdjax.client.types import ResultBuilder

FLAGS = flags.FLAGS

flags.DEFINE_string("target", "127.0.0.1:50051", "Router address host:port.")
flags.DEFINE_string("prompt", None, "Text prompt (tokenized by the router).")
flags.DEFINE_list("prompt_token_ids", None,
                  "Prompt as a comma list of token ids (no BOS added).")
flags.DEFINE_integer("max_tokens", 16, "Output budget.")
flags.DEFINE_float("temperature", None,
                   "0 = greedy; unset: the server's default (1.0).")
flags.DEFINE_float("top_p", None, "Nucleus mass; unset: server default.")
flags.DEFINE_integer("top_k", None, "Top-k (0/-1 off); unset: server default.")
flags.DEFINE_float("min_p", None, "Min-p in [0, 1] (0 off); unset: server "
                   "default.")
flags.DEFINE_integer("min_tokens", None, "No EOS or stop id before this many "
                     "tokens; unset: server default (0).")
flags.DEFINE_float("presence_penalty", None, "In [-2, 2]; unset: server "
                   "default (0, off).")
flags.DEFINE_float("frequency_penalty", None, "In [-2, 2]; unset: server "
                   "default (0, off).")
flags.DEFINE_float("repetition_penalty", None, "In (0, 2]; unset: server "
                   "default (1, off).")
flags.DEFINE_integer("seed", None, "Sampling seed (reproducible output).")
flags.DEFINE_list("stop_token_ids", None, "Comma list of stop token ids.")
flags.DEFINE_bool("ignore_eos", False, "Generate past EOS.")
flags.DEFINE_bool("speculative", None,
                  "false: opt out of the decode pool's speculative decoding; "
                  "unset: the pool's setting applies.")
flags.DEFINE_bool("add_special_tokens", None,
                  "BOS for text prompts; unset: server default (true).")
flags.DEFINE_bool("skip_special_tokens", False,
                  "Drop special tokens from the text.")
flags.DEFINE_string("request_id", None, "Request id (default: router's).")
flags.DEFINE_string("cache_salt", None, "Prefix-cache isolation salt.")
flags.DEFINE_bool("stream", True, "Print text deltas as they arrive.")
flags.DEFINE_string("tls_ca", None, "PEM root CA: dial with TLS.")
flags.DEFINE_string("tls_cert", None, "PEM client certificate (mTLS).")
flags.DEFINE_string("tls_key", None, "PEM client private key (mTLS).")
flags.DEFINE_string("tls_server_name", None,
                    "Name to verify in the server certificate, if not the "
                    "target's host.")
flags.DEFINE_string("token", None, "Bearer token.")
flags.DEFINE_float("timeout_s", None, "Deadline of each call (s).")
flags.DEFINE_bool("json", False, "Print the full result as JSON.")
flags.DEFINE_bool("info", False, "Print the model info (JSON).")
flags.DEFINE_float("wait_ready_s", 0.0,
                   "First wait up to this long for the router to be SERVING.")


def _ints(values: list[str] | None, name: str) -> list[int] | None:
  if values is None:
    return None
  try:
    return [int(v) for v in values]
  except ValueError as e:
    raise app.UsageError(f"--{name}: {e}") from e


def _tls() -> TlsConfig | None:
  if not any((FLAGS.tls_ca, FLAGS.tls_cert, FLAGS.tls_key)):
    return None
  try:
    return TlsConfig(root_ca=FLAGS.tls_ca, cert=FLAGS.tls_cert,
                     key=FLAGS.tls_key, server_name=FLAGS.tls_server_name)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def _request_options() -> dict[str, Any]:
  return dict(
      prompt_token_ids=_ints(FLAGS.prompt_token_ids, "prompt_token_ids"),
      max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature,
      top_p=FLAGS.top_p, top_k=FLAGS.top_k, min_p=FLAGS.min_p,
      min_tokens=FLAGS.min_tokens,
      presence_penalty=FLAGS.presence_penalty,
      frequency_penalty=FLAGS.frequency_penalty,
      repetition_penalty=FLAGS.repetition_penalty, seed=FLAGS.seed,
      stop_token_ids=_ints(FLAGS.stop_token_ids, "stop_token_ids"),
      ignore_eos=FLAGS.ignore_eos, speculative=FLAGS.speculative,
      request_id=FLAGS.request_id,
      add_special_tokens=FLAGS.add_special_tokens,
      skip_special_tokens=FLAGS.skip_special_tokens,
      cache_salt=FLAGS.cache_salt)


def _summary(r: GenerationResult, client_ttft_s: float | None,
             client_total_s: float) -> str:
  """One line: what the router measured, then what this client saw."""
  parts = [f"[{r.request_id or '-'}] finish={r.finish_reason}"]
  u = r.usage
  if u is not None:
    parts.append(f"tokens={u.prompt_tokens}+{u.completion_tokens}")
    parts.append(f"ttft={u.ttft_s * 1e3:.1f}ms total={u.total_time_s:.3f}s")
    if u.spec_draft_tokens:
      parts.append(f"spec={u.spec_accepted_tokens}/{u.spec_draft_tokens}")
    if u.prefill_worker or u.decode_worker:
      parts.append(f"workers={u.prefill_worker or 'local'}->"
                   f"{u.decode_worker or '?'}")
  else:
    parts.append(f"tokens=?+{len(r.token_ids)}")
  client = f"client: total={client_total_s:.3f}s"
  if client_ttft_s is not None:
    client = f"client: ttft={client_ttft_s * 1e3:.1f}ms total=" \
             f"{client_total_s:.3f}s"
  parts.append(f"({client})")
  return " ".join(parts)


def _run(client: Client) -> None:
  if FLAGS.wait_ready_s > 0:
    client.wait_ready(FLAGS.wait_ready_s)
  if FLAGS.info:
    print(json.dumps(client.model_info(), indent=2), flush=True)
    if FLAGS.prompt is None and FLAGS.prompt_token_ids is None:
      return
  if (FLAGS.prompt is None) == (FLAGS.prompt_token_ids is None):
    raise app.UsageError("set exactly one of --prompt and --prompt_token_ids "
                         "(or --info alone)")

  options = _request_options()
  start = time.perf_counter()
  ttft = None
  builder = ResultBuilder()
  echo = FLAGS.stream and not FLAGS.json
  # Streaming even when not echoing costs nothing and gives the client TTFT.
  try:
    stream = client.stream(FLAGS.prompt, **options)
  except (ValueError, TypeError) as e:
    raise app.UsageError(str(e)) from e
  try:
    for delta in stream:
      if ttft is None and delta.token_ids:
        ttft = time.perf_counter() - start
      builder.add(delta)
      if echo and delta.text:
        sys.stdout.write(delta.text)
        sys.stdout.flush()
  finally:
    stream.close()  # Ctrl-C: cancel the request on the router.
  result = builder.result()
  total = time.perf_counter() - start

  if FLAGS.json:
    print(json.dumps(result.to_dict()), flush=True)
  elif echo:
    print(flush=True)
  else:
    print(result.text, flush=True)
  print(_summary(result, ttft, total), file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with Client(FLAGS.target, timeout_s=FLAGS.timeout_s, tls=_tls(),
              token=FLAGS.token) as client:
    try:
      _run(client)
    except GenerationError as e:
      print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
      return 1
    except TimeoutError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    except KeyboardInterrupt:
      print("\ninterrupted", file=sys.stderr)
      return 130
  return 0


if __name__ == "__main__":
  app.run(main)
