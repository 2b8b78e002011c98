#!/usr/bin/env bash
# An earlier commit's tree, staged for a GPU call that measures it beside
# this one on the same machine (the device machine gets the working tree,
# not its history): the serving code and what the GPU scripts run of it,
# into .baseline/ (ignored by git: name it in the call's carry). Runs of
# tools/gpu/run_ttft_hops.sh marked ":base" then serve from it.
#
#   bash tools/gpu/stage_baseline.sh COMMIT
set -eu
commit=${1:?usage: stage_baseline.sh COMMIT}
cd "$(dirname "$0")/../.."
rm -rf .baseline
mkdir .baseline
git archive "$commit" pdjax pyproject.toml tools/batch_eval.py \
  tools/gpu/gpu_env.sh tools/gpu/run_serving_one_gpu.sh \
  tools/gpu/ttft_hops.patch tools/gpu/ttft_hops.py | tar -x -C .baseline
git rev-parse --short "$commit" > .baseline/COMMIT
echo "staged $(cat .baseline/COMMIT) in .baseline ($(du -sh .baseline | cut -f1))"
