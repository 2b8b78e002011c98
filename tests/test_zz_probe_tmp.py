from tests.test_host_tier import tiny, decode_params  # noqa
import tests.test_host_tier as t
from pdjax.engine.colocated import ColocatedEngine
import numpy as np

def test_probe(decode_params):
  params, cfg, mesh, rules = decode_params
  rng = np.random.RandomState(3)
  base = rng.randint(3, 500, size=60).tolist()
  prompts = [base[:rng.randint(17, 60)] + rng.randint(3, 500, size=5).tolist()
             for _ in range(10)]
  prompts += prompts[:4]
  on = ColocatedEngine(params, cfg, mesh, rules, t.PCFG, t._dcfg(host_cache_blocks=6))
  for i, p in enumerate(prompts):
    on.submit(str(i), p, t._greedy(), lambda ev: None)
  on.drain()
  rep = on.decode.replicas[0]
  print("TIER", rep.host_tier.tier.stats, dict(rep.host_tier.stats), dict(rep.pool.stats), on.prefill[0].stats, rep.host_tier.memory_kind)
