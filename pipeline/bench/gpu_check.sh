#!/usr/bin/env bash
# The GPU check behind docs/performance.md: the teacher pass against a bare forward loop on one GPU,
# BERT-base-shaped masked LM under bf16 autocast. Runs the in-process executor (the same
# ShardProcessor the Ray actors run; a GPU image without Ray can run it). Results land in $OUT.
#   OUT=/tmp/gpu bash pipeline/bench/gpu_check.sh     (TOKENS=... DEVICE=... SHARDS=... to change)
# Each case prints three rates: the bare loop, the teacher runner alone (forward + top-k + codecs on
# the GPU + copy to host, one batch at a time) and the full pass; host.log has the host pipeline
# alone (no forward), i.e. the ceiling the CPUs set; runner_profile_*.log split one batch's device time.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kdcache-gpu}
mkdir -p "$OUT"
# No TOKENIZERS_PARALLELISM=false: the pass forks nothing (its worker processes are spawned), and the
# tokenizer's own threads are what lets the corpus reader keep up with the GPU.
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
TOKENS=${TOKENS:-2097152}  # ~2 s of a 1M tokens/s teacher: shorter runs measure mostly start-up
BATCH=${BATCH:-128}
SHARDS=${SHARDS:-0}  # shards in flight (0 = auto: 4 for top-k only, more with hidden states)
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, pyarrow, numpy, os; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'numpy', numpy.__version__, 'cpus', os.cpu_count())" | tee -a "$OUT/gpu.txt"
# Device encoding must give the host encoder's bytes: the codec equality tests, on the GPU too.
$PY -m pytest -q -p no:cacheprovider tests/storage/test_codecs.py tests/storage/test_dense_forms.py -k "torch or pre_encoded" 2>&1 | tail -3 \
  | tee "$OUT/device_encoding.log"
# The tests that need CUDA (deselected on CPU machines): training on the GPU with checkpoint/resume.
$PY -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -3 | tee "$OUT/gpu_tests.log"
# Where one batch's device time goes (forward, normaliser + top-k, codecs, copy): the first thing to
# read when the runner rate falls short of the bare loop.
for hidden in none 0,6,12; do
  echo "== runner profile, hidden layers $hidden"
  $PY -m kdcache.pipeline.bench.runner_profile --device "$DEVICE" --batch-size "$BATCH" --hidden-layers "$hidden" --json \
    2>&1 | grep -v -E "Warning|warn\(" | tee "$OUT/runner_profile_${hidden//,/-}.log" | tail -8
done
run() {  # name, extra flags...
  local name=$1; shift
  echo "== $name"
  $PY -m kdcache.pipeline.cli.main bench cache --teacher bert-base --executor local --device "$DEVICE" --tokens "$TOKENS" \
    --batch-size "$BATCH" --shards-in-flight "$SHARDS" --repeats 3 --json "$@" 2>&1 | grep -v -E "Warning|warn\(" \
    | tee "$OUT/$name.log" | tail -7
}
run topk64                                   # top-64 soft targets only (pretraining KD)
run topk64_hidden --hidden-layers 0,6,12     # + three hidden layers (DistilBERT/TinyBERT-style)
run topk64_attn --hidden-layers 12 --attention-layers 12   # + eager attention for one layer
echo "== host pipeline (no forward: outputs computed once on the GPU, then the real copy, encode, write)"
$PY -m kdcache.pipeline.bench.host_pipeline --device "$DEVICE" --shards-in-flight "$SHARDS" --json 2>&1 \
  | grep -v -E "Warning|warn\(" | tee "$OUT/host.log" | tail -3
