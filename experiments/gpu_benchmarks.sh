#!/bin/bash
# The GPU measurements of issues 4, 6 and 7 in one command (ImageNet-shaped ResNet-50 in bf16,
# then CIFAR-shaped ResNet-20 and the Fashion-MNIST CNN in fp32), JSON into DIR.
#   bash experiments/gpu_benchmarks.sh [DIR]     # DIR defaults to experiments/results
set -u
out=${1:-experiments/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
python3 experiments/benchmark.py --models resnet50 --dtype bfloat16 --batch 256 \
  --rounds 3 --steps 10 --skip_pipeline --skip_compile_count --out "$out/benchmark_gpu_resnet50.json"
python3 experiments/benchmark.py --models resnet20,fmnist_cnn --dtype float32 --batch 128 \
  --rounds 3 --steps 10 --skip_pipeline --out "$out/benchmark_gpu_small.json"
