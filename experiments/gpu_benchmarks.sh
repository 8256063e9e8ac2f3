#!/bin/bash
# The GPU measurements in one command, JSON into DIR:
#   bash experiments/gpu_benchmarks.sh [DIR] [all|recipes]    # DIR defaults to experiments/results
# all (issues 4, 6 and 7): ImageNet-shaped ResNet-50 in bf16, then CIFAR-shaped ResNet-20 and the
# Fashion-MNIST CNN in fp32. recipes (issue 26): the paper's ImageNet ResNet-18 recipes (torchvision
# layout, joint distillation, bf16, batch 256) against their student and teacher alone.
set -u
out=${1:-experiments/results}
what=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
if [ "$what" = all ]; then
  python3 experiments/benchmark.py --models resnet50 --dtype bfloat16 --batch 256 \
    --rounds 3 --steps 10 --skip_pipeline --skip_compile_count --out "$out/benchmark_gpu_resnet50.json"
  python3 experiments/benchmark.py --models resnet20,fmnist_cnn --dtype float32 --batch 128 \
    --rounds 3 --steps 10 --skip_pipeline --out "$out/benchmark_gpu_small.json"
fi
for recipe in imagenet_resnet18_w4a4_kd imagenet_resnet18_w2a2_kd; do
  python3 experiments/benchmark.py --recipe $recipe --rounds 3 --steps 10 --skip_pipeline \
    --skip_compile_count --out "$out/benchmark_gpu_$recipe.json"
done
