#!/usr/bin/env bash
# The GPU overhead benchmark (SPEC §5) in one command: every method and control on LLaMA-3.2-1B and
# LLaMA-3-8B shapes (random weights, no download), bf16, one H100/H200, activation checkpointing off
# and on, plus bf16 exactness of the frozen weights, and the Stable Diffusion 1.5 UNet's shapes
# (LoRA through diffusers' add_adapter). Needs only PyTorch, Transformers, PEFT, Accelerate and, for
# the UNet rows, diffusers (the `diffusers` extra); runs from the source tree. Stays under 8 minutes (the time plan is in
# benchmarks/gpu_suite.py) and writes JSON and Markdown (summary.md) into one folder.
#
#   bash benchmarks/gpu.sh                      # -> benchmarks/results/gpu-<UTC time>/
#   bash benchmarks/gpu.sh OUT_DIR
#   bash benchmarks/gpu.sh OUT_DIR --smoke      # the same code on CPU, tiny shapes, seconds (CI)
#   bash benchmarks/gpu.sh --smoke OUT_DIR      # flags and OUT_DIR in any order (or --out-dir DIR);
#                                               # the flags are gpu_suite.py's (--help lists them)
set -euo pipefail
cd "$(dirname "$0")/.."
# OUT_DIR is the one argument that is neither a flag nor a flag's value: --smoke, --help and -h take
# no value, --only takes the names after it, every other flag (--budget-s ...) takes one value.
out="" args=() takes=""
while (($#)); do
  case "$1" in
    --smoke|--help|-h) args+=("$1"); takes="" ;;
    --out-dir) (($# >= 2)) || { echo "gpu.sh: --out-dir needs a folder" >&2; exit 2; }
               out="$2"; shift; takes="" ;;
    --out-dir=*) out="${1#*=}"; takes="" ;;
    --only) args+=("$1"); takes="many" ;;
    --*=*) args+=("$1"); takes="" ;;
    -*) args+=("$1"); takes="one" ;;
    *) if [[ -n $takes ]]; then
         args+=("$1"); [[ $takes == one ]] && takes=""
       elif [[ -z $out ]]; then
         out="$1"
       else
         echo "gpu.sh: two output folders given ($out, $1); pass one (flags start with --)" >&2; exit 2
       fi ;;
  esac
  shift
done
out="${out:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%S)}"
python="${PYTHON:-python}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
"$python" -c 'import torch, transformers, peft, accelerate
print("torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__,
      "| accelerate", accelerate.__version__, "| cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'
exec "$python" benchmarks/gpu_suite.py --out-dir "$out" ${args[@]+"${args[@]}"}
