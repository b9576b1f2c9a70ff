#!/usr/bin/env bash
# Multi-node DMC retraining under SLURM: one task per node, torchrun starts one process per GPU with a c10d
# rendezvous on the first node, and Lightning reads the torchrun environment (RANK, WORLD_SIZE, ...).
#
#   sbatch --nodes 2 scripts/slurm_train.sh llama2-13b-4x [--section.key=value ...]
#   scripts/slurm_train.sh --dry-run llama2-13b-4x   # print each node's command, run nothing
#
# run.num_nodes and run.devices are passed from the allocation (--nodes, GPUS_PER_NODE, default 8), so the
# recipe always agrees with what SLURM gave. Outside an allocation, --dry-run reads SLURM_JOB_NODELIST
# (comma-separated host names when scontrol is not installed) and SLURM_NNODES from the environment.
#SBATCH --job-name=dmc-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
config=${1:?usage: sbatch --nodes N scripts/slurm_train.sh [--dry-run] CONFIG [overrides]}
shift
: "${SLURM_JOB_NODELIST:?not in a SLURM allocation: sbatch this script (or set SLURM_JOB_NODELIST and SLURM_NNODES with --dry-run)}"
: "${SLURM_NNODES:?SLURM_NNODES is not set}"
hosts() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$SLURM_JOB_NODELIST"
  else
    tr ',' '\n' <<<"$SLURM_JOB_NODELIST"
  fi
}
head_node=$(hosts | head -n 1)
gpus=${GPUS_PER_NODE:-8}
port=${MASTER_PORT:-29500}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
cmd=(torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$gpus"
  --rdzv_backend c10d --rdzv_endpoint "$head_node:$port" --rdzv_id "${SLURM_JOB_ID:-dmc}"
  -m dmc.cli train --config "$config" --run.num_nodes "$SLURM_NNODES" --run.devices "$gpus" "$@")
if [ "$dry_run" = 1 ]; then
  for host in $(hosts); do
    printf 'node %s: %s\n' "$host" "${cmd[*]}"
  done
  exit 0
fi
srun "${cmd[@]}"
