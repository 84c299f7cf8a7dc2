#!/usr/bin/env bash
# One-shot GPU check of the cluster: 2 colocated workers vs 1 prefill + 1 decode worker, both on
# the one GPU, same workload and seed, llama-3.1-8b-shaped dummy weights in bf16.
# The GPU box has torch+CUDA but not our server dependencies and no network: it installs wheels
# carried in .gpuwheels/ (pip download --python-version 3.12 ...) into a private folder.
# Usage (repo root, on the GPU box): bash bench/gpu_pd.sh [OUT_DIR]
set -u
OUT=${1:-${OUT:-bench/results}}
mkdir -p "$OUT"
DEPS=/tmp/pdserve-deps
python3 -m pip install -q --no-deps --target "$DEPS" .gpuwheels/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:$DEPS" PYTHONUNBUFFERED=1
PORT=8300
cat > /tmp/gpu_cluster.yaml <<YAML
model: llama-3.1-8b
dtype: bfloat16
device: cuda
threads: 4
kv_cache_memory_gb: 12
YAML

run_mode() {
  local name=$1; shift
  echo "== $name: pdserve up $*"
  python3 -m pdserve.cli up --config /tmp/gpu_cluster.yaml --port $PORT "$@" > "$OUT/gpu_pd_$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 150); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    sleep 1
  done
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null || { echo "$name did not start"; tail -20 "$OUT/gpu_pd_$name.log"; kill -INT $pid; return; }
  timeout 150 python3 -m pdserve.cli bench run --url "http://127.0.0.1:$PORT" --model llama-3.1-8b \
    --workload chatbot --length-scale 0.5 --rate 2 --num-requests 24 --seed 0 --no-progress \
    --slo-ttft-ms 2000 --slo-tpot-ms 100 --out "$OUT/gpu_pd_$name.json" 2>&1 | tail -25
  kill -INT $pid; wait $pid
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run_mode colocated --colocated 2 --prefill 0 --decode 0
run_mode disagg --prefill 1 --decode 1
