#!/usr/bin/env bash
# Serving latency of two trees of pdjax on one GPU, alternating in one
# device call (a change against the commit before it: figures from
# different calls, even on the same kind of card, differ by the host's
# speed): each side runs tools/gpu/run_serving_one_gpu.sh from its own
# tree, ROUNDS times, base first.
#
#   git archive BASE_REV | tar -x -C .ab/base   # and .ab/new from the change
#   bash tools/gpu/run_serving_ab.sh OUT_DIR .ab/base .ab/new
#
# (the device tool carries .ab when named in its carry list.)
# DEPLOYMENTS (default "coloc disagg"), ROUNDS (2), BUDGET_S per run (120).
set -u
OUT=${1:?usage: run_serving_ab.sh OUT_DIR BASE_TREE NEW_TREE}
BASE=${2:?base tree}
NEW=${3:?new tree}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
. tools/gpu/gpu_env.sh
install_carried_wheels > /dev/null
for i in $(seq "${ROUNDS:-2}"); do
  for side in base new; do
    tree=$BASE; [[ $side == new ]] && tree=$NEW
    d=$OUT/$side$i
    mkdir -p "$d"
    (cd "$tree" && DEPLOYMENTS="${DEPLOYMENTS:-coloc disagg}" \
       BUDGET_S=${BUDGET_S:-120} bash tools/gpu/run_serving_one_gpu.sh "$d" \
       > "$d.console.txt" 2>&1)
    echo "##### $side$i"
    grep -E "^=== |c=(1|32): exit|^TTFT |^TPOT |^prefill |^return" \
      "$d.console.txt"
  done
done
# The device tool returns a few files: the consoles and one archive of
# the runs' folders.
(cd "$OUT" && dirs=$(find . -maxdepth 1 -type d \( -name 'base*' -o -name 'new*' \)) \
   && tar czf runs.tar.gz $dirs && rm -rf $dirs)
