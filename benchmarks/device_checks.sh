#!/usr/bin/env bash
# The GPU checks, in one run, for a session lent a GPU machine (its python has torch and triton; no ray,
# mlflow or boto3). From the repository root:   bash benchmarks/device_checks.sh [python]
#   1. the CUDA tests of the model library (fused kernels vs the dense oracle at 97x97x512, AMP finiteness);
#   2. the fused-attention benchmark (97x97x512, batch 8, bf16) and the paper's efficiency table;
#   3. the training-step benchmark (CCNet-R101, 769x769, batch 8, O0/O1/O2), which reads shards through
#      pipeline.io.storage and so needs boto3: bring its wheels (boto3, botocore, s3transfer, jmespath) first.
set -uo pipefail
PYTHON=${1:-python}
status=0
run() { echo "== $*"; "$@" || status=1; }

if "$PYTHON" -c "import pytest" 2>/dev/null; then
    run "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/ccnet
else
    echo "== pytest missing: skipping the CUDA tests"
fi
run "$PYTHON" benchmarks/fused_attention.py
run "$PYTHON" benchmarks/attention_efficiency.py --repeats 3
if "$PYTHON" -c "import boto3" 2>/dev/null; then
    run "$PYTHON" benchmarks/train_step.py --steps 10
else
    echo "== boto3 missing: skipping benchmarks/train_step.py (bring its wheels)"
fi
exit $status
