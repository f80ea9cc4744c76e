#!/usr/bin/env bash
# The plans in docs/benchmarks.md ("TPU plans"): EmoLA-7B/13B train and generate steps compiled for
# TPU topologies by libtpu's compile-only client (no TPU needed; 2-5 minutes of 2 CPU cores per 7B
# compile, about an hour in all). Usage: bash benchmarks/tpu_plans.sh [OUT_DIR]  (each plan's output
# in OUT_DIR/NAME.txt)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-tpu_plans}"
mkdir -p "$out"
plan() {  # NAME ARGS...
  local name="$1"; shift
  echo "== $name: python run.py plan $*" | tee "$out/$name.txt"
  python run.py plan "$@" 2>&1 | tee -a "$out/$name.txt"
}
r8='--set model.lora.rank=8 --set model.lora.alpha=16'  # torchtune's QLoRA setting: rank 8 on all seven projections
# LoRA bf16, EmoLA's rank 128
plan lora-v5e-8     --topology v5e-8   --mesh data=1,fsdp=-1 --max-batch 16
plan lora-v5e-1     --topology v5e-1   --mesh data=1 --no-search
plan lora-v5e-256   --topology v5e-256 --mesh data=-1,fsdp=8 --no-search
plan lora-v5p-8     --topology v5p-8   --mesh data=1,fsdp=-1 --no-search
plan lora-v6e-8     --topology v6e-8   --mesh data=1,fsdp=-1 --no-search
plan lora-v4-8      --topology v4-8    --mesh data=1,fsdp=-1 --no-search
plan lora13b-v5e-16 --topology v5e-16 --config emola_13b --mesh data=1,fsdp=-1 --no-search
# QLoRA on one v5e chip
plan nf4-r8-v5e-1   --topology v5e-1 --mesh data=1 --quantize nf4 $r8 --no-search
plan nf4-r128-v5e-1 --topology v5e-1 --mesh data=1 --quantize nf4 --no-search
plan nf4-r128-offload-v5e-1 --topology v5e-1 --mesh data=1 --quantize nf4 --remat offload --no-search
plan int8-r128-v5e-1 --topology v5e-1 --mesh data=1 --quantize int8 --remat offload --no-search
# splash against XLA's attention, 2048 and 4096 tokens
plan xla-2048-v5e-8    --topology v5e-8 --mesh data=1,fsdp=-1 --set train.attention=xla --no-search
plan splash-4096-v5e-8 --topology v5e-8 --mesh data=1,fsdp=-1 --seq 4096 --batch 2 --no-search
plan xla-4096-v5e-8    --topology v5e-8 --mesh data=1,fsdp=-1 --seq 4096 --batch 2 --set train.attention=xla --no-search
# evaluation's generate step (prefill 640 + 128 new tokens), the model replicated on each chip
plan eval-v5e-8    --topology v5e-8 --evaluate --batch 4 --no-search
plan eval-v6e-8    --topology v6e-8 --evaluate --batch 4 --no-search
plan eval-v6e-8-16 --topology v6e-8 --evaluate --batch 16 --no-search
