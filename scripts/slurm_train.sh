#!/usr/bin/env bash
# Multi-node DMC retraining under SLURM: one task per node, torchrun starts one process per GPU, and
# Lightning reads the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).
#
#   sbatch --nodes 2 scripts/slurm_train.sh configs/llama2-13b-4x.yaml [--section.key=value ...]
#
# The recipe's run.num_nodes must equal --nodes, and run.devices the GPUs per node.
#SBATCH --job-name=dmc-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
config=${1:?usage: sbatch --nodes N scripts/slurm_train.sh CONFIG [overrides]}
shift
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=$head_node MASTER_PORT=${MASTER_PORT:-29500}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
  -m dmc.cli train --config "$config" --run.num_nodes "$SLURM_NNODES" "$@"
