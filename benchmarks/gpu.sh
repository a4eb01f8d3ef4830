#!/usr/bin/env bash
# The checks that need a GPU, in one run: the benchmarks that mean something
# on an accelerator, then the unit tests on it. From the repository root:
#   OUT=/some/folder bash benchmarks/gpu.sh
# Needs jax with CUDA, optax, and pytest, pytest-xdist, hypothesis, chex and
# flax for the tests. Writes gpu.json (make_docs.py reads it), the tables and
# the test log to $OUT.
set -u
OUT=${OUT:-/tmp/optax_clipkit_gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
$PY -c "import jax, optax; print('jax', jax.__version__, 'optax', optax.__version__, jax.devices())"

SECONDS=0
timeout "${BENCH_S:-270}" $PY benchmarks/run.py \
  --only "${BENCH_ONLY:-bandwidth,stateful,guard,step,memory}" \
  --json "$OUT/gpu.json" \
  > "$OUT/bench.md" 2> "$OUT/bench.err"
echo "run.py: rc $? in ${SECONDS}s"; SECONDS=0
timeout 90 $PY benchmarks/adaptive_overhead.py > "$OUT/adaptive_overhead.md" 2>&1
echo "adaptive_overhead.py: rc $? in ${SECONDS}s"; SECONDS=0
timeout 120 $PY benchmarks/grouped_norm.py > "$OUT/grouped_norm.md" 2>&1
echo "grouped_norm.py: rc $? in ${SECONDS}s"; SECONDS=0
timeout 60 $PY -m optax_clipkit.demo > "$OUT/demo.log" 2>&1
echo "demo: rc $? in ${SECONDS}s"; SECONDS=0

# One GPU: the tests that build an 8-device mesh need the 8 CPU devices of
# tests/conftest.py as the default backend, so they are left out here.
timeout "${TEST_S:-200}" $PY -m pytest -q -n 8 -p no:cacheprovider -p no:benchmark \
  tests/test_rules.py tests/test_conformance.py tests/test_adaptive.py \
  tests/test_skip.py tests/test_metrics.py tests/test_monitor.py \
  tests/test_per_module.py optax_clipkit \
  -k "not sharded and not shard_map and not shard_stability and not axis_name" \
  > "$OUT/pytest.log" 2>&1
echo "pytest: rc $? in ${SECONDS}s"
tail -n 15 "$OUT/pytest.log"
tail -n 12 "$OUT/demo.log"
cat "$OUT/adaptive_overhead.md" "$OUT/grouped_norm.md" "$OUT/bench.md"
