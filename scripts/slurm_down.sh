#!/usr/bin/env bash
# Stop the single-node SLURM cluster that scripts/slurm_up.sh started.
pkill -x slurmd || true
pkill -x slurmctld || true
pkill -x munged || true
