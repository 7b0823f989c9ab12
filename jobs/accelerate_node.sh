#!/bin/bash
# One node's share of a (multi-node) run, started once per node by jobs/finetune.slurm's srun:
# accelerate launches GPUS_PER_NODE processes here (torchrun), machine rank SLURM_NODEID of
# SLURM_NNODES, meeting at MASTER_ADDR:MASTER_PORT.
#   bash jobs/accelerate_node.sh CONFIG [scripts.finetune arguments]
# Precision comes from the config (precision, tf32), not from accelerate's --mixed_precision.
set -euo pipefail

cfg="$1"; shift
nodes="${SLURM_NNODES:-1}"
gpus="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
exec "${PYTHON:-python}" -m accelerate.commands.launch --multi_gpu \
    --num_machines "$nodes" --machine_rank "${SLURM_NODEID:-0}" --num_processes "$((nodes * gpus))" \
    --main_process_ip "${MASTER_ADDR:-127.0.0.1}" --main_process_port "${MASTER_PORT:-29500}" \
    --mixed_precision no --dynamo_backend no \
    -m scripts.finetune --cfg "$cfg" "$@"
