#!/usr/bin/env bash
# GPU check: fp16 training steps of every paper preset (samples/s, MFU against the GPU's dense
# fp16 peak), fp32 GPU vs CPU loss on one fixed batch, a 2-process NCCL DDP step (1-process NCCL
# init on one GPU), and one encoder evaluated on the GPU. Under 8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh             # on a CUDA machine, from anywhere
#   benchmarks/gpu_check.sh --dry-run   # the same code on the CPU at toy sizes (the tests run it)
#
# PYTHON picks the interpreter (default: python). Details: benchmarks/gpu_check.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"
