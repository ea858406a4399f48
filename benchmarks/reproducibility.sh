#!/usr/bin/env bash
# The quickstart config for 100 steps, twice, then once with the CPU kernels of a CPU without AVX2: on one
# machine the figures are equal; another CPU's kernels move them (README, "How far its figures move").
#   bash benchmarks/reproducibility.sh            # from the repository root, after `make demo` or `make test`
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=runs/reproducibility
export RAY_USAGE_STATS_ENABLED=0
[ -f $OUT/data/generated/v1/manifest.json ] || $PY -m pipeline.cli data prepare --dataset generated \
    --out $OUT/data --count train=256,val=32 --image-size 192
for name in a b no-avx2; do
  extra=()
  [ $name = no-avx2 ] && extra=(ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41)
  env "${extra[@]}" $PY -m pipeline.cli train -c configs/quickstart_ccnet-tiny_generated-192x192_cpu.yaml \
    --set data.uri=$OUT/data/generated/v1 --set run.storage=$OUT/checkpoints --set run.name=repro-$name \
    --set train.iterations=100 --set train.eval_every=50 --set train.checkpoint_every=100 \
    --set tracking.uri=sqlite:///$PWD/$OUT/mlflow.db > $OUT/$name.log 2>&1
  echo "== $name"; grep -E "^\| (single|multi)" $OUT/$name.log
done
