#!/usr/bin/env bash
# One GPU lease's work, as run on the lent H100 (see benchmarks/README.md):
#   bash benchmarks/gpu_session.sh train OUT_DIR   # shapes model: timed training + adherence
#   bash benchmarks/gpu_session.sh bench OUT_DIR   # SD 1.5 512x512 bf16: sd-jax vs diffusers
# Environment: BUDGET (train seconds, default 150), CONFIGS (bench STEPSxBATCH list),
# STARTUP= (empty: skip the bench's persistent-cache start-up measurement).
# Wheels for what the machine lacks (diffusers, and the tested flax/optax/orbax) are in
# .whl/ when present (pip download ... -d .whl, see the device notes).
set -uo pipefail
mode=$1
out=$2
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
log=$out/$mode.log
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import jax, flax, optax, orbax.checkpoint as oc, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', oc.__version__, 'torch', torch.__version__, jax.devices())"
} 2>&1 | tee "$log"

if [ "$mode" = train ]; then
  budget=${BUDGET:-150}
  python3 benchmarks/train_shapes_timed.py --budget "$budget" --probe 60 --out /tmp/run -- \
    --model checkpoints/sd-jax-shapes --train unet,text_encoder --batch-size 64 --warmup 100 --lr 5e-4 \
    --save-every 100000 2>&1 | tee -a "$log"
  python3 benchmarks/bench_adherence.py --model /tmp/run/model --guidance 2 4 7.5 --out "$out/adherence" 2>&1 \
    | tee -a "$log"
  cp /tmp/run/loss.png "$out/" 2>/dev/null
  tar czf - -C /tmp/run model loss.jsonl | split -b 12M - "$out/model.tgz."
elif [ "$mode" = bench ]; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45   # the rest of the GPU's memory is PyTorch's
  python3 benchmarks/bench_pipeline.py --dtype bf16 --iters 2 --configs ${CONFIGS:-20x1 50x1 20x8 20x32 20x64} \
    --peak-tflops 989 ${STARTUP---cache-startup} --json "$out/bench_pipeline.json" 2>&1 | tee -a "$log"
fi
