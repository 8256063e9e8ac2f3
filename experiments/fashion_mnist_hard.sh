#!/usr/bin/env bash
# The hard Fashion-MNIST sweep (every layer at W2A2; configs/fashion_mnist_hard_*.py):
# seed 0 of every method first, the most telling first (the clip-ReLU FP last: with no
# quantized layer it is the first sweep's FP network), then seeds 1 and 2; W4A4 direct and
# progressive beside W2A2; plots after each pass; then the pilot's longer-budget check.
# Every step is resumable: rerunning this script continues and starts nothing done.
#
#   PYTHON=/path/to/python bash experiments/fashion_mnist_hard.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
W2A2=direct,fp_relu,progressive_rounds,progressive,two_stage,two_stage_rounds,stochastic
W2A2+=,distill,progressive+distill,stochastic+distill,fp
sweep() { "$PY" experiments/sweep.py --name fashion_mnist_hard --family fashion_mnist_hard "$@"; }
for seeds in 0 0,1,2; do
  sweep --methods "$W2A2" --bits 2 --seeds "$seeds"
  sweep --methods direct,progressive --bits 4 --seeds "$seeds"
  "$PY" experiments/plot.py --name fashion_mnist_hard
done
"$PY" experiments/pilot.py --settings every_layer_6ep
