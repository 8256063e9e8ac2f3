#!/usr/bin/env bash
# The hard Fashion-MNIST sweep (every layer at W2A2; configs/fashion_mnist_hard_*.py), in
# passes ordered by what each settles first: (1) FP, direct and in-run progressive at W2A2 over
# three seeds (does the best remedy close half of direct's gap?); (2) seed 0 of the learned
# quantizers (LSQ, PACT, progressive + LSQ); (3) seed 0 of every other W2A2 method (the
# clip-ReLU FP last: with no quantized layer it is the first sweep's FP network); (4) W4A4
# direct, progressive and the learned quantizers, seed 0; (5) seeds 1 and 2 of everything;
# plots after each pass; then the pilot's longer-budget check.
# Every step is resumable: rerunning this script continues and starts nothing done.
#
#   PYTHON=/path/to/python bash experiments/fashion_mnist_hard.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
KEY=direct,fp_relu,progressive
LEARNED=lsq,pact,progressive+lsq
W2A2=$KEY,progressive_rounds,two_stage,two_stage_rounds,stochastic
W2A2+=,distill,progressive+distill,stochastic+distill,fp,$LEARNED
W4A4=direct,progressive,$LEARNED
sweep() { "$PY" experiments/sweep.py --name fashion_mnist_hard --family fashion_mnist_hard "$@"; }
plot() { "$PY" experiments/plot.py --name fashion_mnist_hard; }
sweep --methods "$KEY" --bits 2 --seeds 0,1,2 && plot
sweep --methods "$LEARNED" --bits 2 --seeds 0 && plot
for seeds in 0 0,1,2; do
  sweep --methods "$W2A2" --bits 2 --seeds "$seeds"
  sweep --methods "$W4A4" --bits 4 --seeds "$seeds"
  plot
done
"$PY" experiments/pilot.py --settings every_layer_6ep
