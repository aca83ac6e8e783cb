#!/usr/bin/env bash
# The README machine table's CUDA row in one call on a lent GPU machine (about 9 minutes on one H200):
#   1. `make demo`'s command (the bundled demo, no flag) with its wall time and its own report;
#   2. bench/end_to_end.py: `accelerate launch train.py --preset cifar10 --train_dir <32 px folder>` against
#      the official step on the same GPU (fp32 and the original --amp);
#   3. bench/gpu.py without torch.compile, in the time that is left.
# Each part has its own time limit, so a failing part leaves the others' results. Logs, JSON and the demo's
# saved model (tar, cut into 15 MiB pieces: `cat demo.tar.* | tar x` joins them) land in OUTDIR.
#
#   bash bench/cuda_row.sh OUTDIR [SECONDS]
#   PY=.venv/bin/python DEMO_FLAGS="--max_train_steps 10" E2E_FLAGS="--steps 20 --official_steps 2" \
#     GPU_FLAGS="--device cpu --tiny" bash bench/cuda_row.sh /tmp/cuda_row 600   # a CPU smoke run
set -u
OUT=${1:-bench/results/cuda_row}
LIMIT=${2:-560}
PY=${PY:-python3}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $((LIMIT - ($(date +%s) - START))); }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
    date -Is
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    nproc
    grep -m1 "model name" /proc/cpuinfo
    $PY -c 'import torch, torchvision, timm, transformers, accelerate, datasets, pyarrow
for m in (torch, torchvision, timm, transformers, accelerate, datasets, pyarrow): print(m.__name__, m.__version__)
print("cuda", torch.cuda.is_available(), torch.version.cuda)'
} 2>&1 | tee "$OUT/machine.txt"

echo "== 1. demo (make demo's command), limit 240 s" | tee "$OUT/demo.log"
rm -rf outputs/corinfomax-demo
t0=$(date +%s%N)
# shellcheck disable=SC2086
timeout 240 $PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no \
    train.py --resume_from_checkpoint latest ${DEMO_FLAGS:-} >>"$OUT/demo.log" 2>&1
rc=$?
t1=$(date +%s%N)
echo "demo exit $rc, wall $(((t1 - t0) / 1000000)) ms" | tee -a "$OUT/demo.log"
if [ -d outputs/corinfomax-demo ]; then
    tar -C outputs -cf - --exclude=checkpoints corinfomax-demo | split -b 15M - "$OUT/demo.tar."
fi

echo "== 2. end to end, limit 120 s" | tee "$OUT/end_to_end.log"
# shellcheck disable=SC2086
timeout 120 $PY bench/end_to_end.py ${E2E_FLAGS:---steps 60} --output "$OUT/end_to_end.json" \
    >>"$OUT/end_to_end.log" 2>&1
echo "end_to_end exit $?" | tee -a "$OUT/end_to_end.log"

remaining=$(($(left) - 10))
echo "== 3. bench/gpu.py, limit $remaining s" | tee "$OUT/gpu.log"
if [ "$remaining" -gt 60 ]; then
    # shellcheck disable=SC2086
    timeout "$remaining" $PY bench/gpu.py ${GPU_FLAGS:---device cuda --no-compile --repeats 3} \
        --output "$OUT/gpu.json" >>"$OUT/gpu.log" 2>&1
    echo "gpu.py exit $?" | tee -a "$OUT/gpu.log"
fi
echo "total $(($(date +%s) - START)) s"
