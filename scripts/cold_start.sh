#!/usr/bin/env bash
# The off-policy cold start, one command per stage, all under one directory DIR:
#   data: opd-data teacher-rollouts        -> DIR/data  (the teacher's filtered answers: DIR/data/data)
#   sft:  opd-train loss=sft rollout=dataset -> DIR/sft   (the student fine-tuned on them)
#   opd:  opd-train from DIR/sft's last checkpoint -> DIR/opd
# Usage: scripts/cold_start.sh DIR [override ...]
# The lengths are 96 tokens: the tens_first teacher's solutions take up to 72 with the demo tokenizer.
# The overrides go to every stage (keys all three read: demo.*, paths.*, task=..., teacher.name_or_path);
# DATA_ARGS, SFT_ARGS and OPD_ARGS add one stage's own (later ones win over the demo-sized defaults below).
# STAGES="sft opd" runs some stages only (each is a separate job on a cluster; a stage reads the previous one's DIR);
# DATA_DIR=<an opd-data output> lets the sft stage read a data set written elsewhere (one data set, several seeds).
# OPD_BIN, DATA_BIN: the commands (default: opd-train and opd-data on PATH; e.g. "python -m opd_cli.commands.train").
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 DIR [override ...]" >&2; exit 2; }
dir=$1
shift
read -ra train <<<"${OPD_BIN:-opd-train}"
read -ra data <<<"${DATA_BIN:-opd-data}"
stages=${STAGES:-data sft opd}
read -ra data_args <<<"${DATA_ARGS:-}"
read -ra sft_args <<<"${SFT_ARGS:-}"
read -ra opd_args <<<"${OPD_ARGS:-}"
data_dir=${DATA_DIR:-$dir/data}

for stage in $stages; do
  case $stage in
    data)
      # the demo teacher's answers to 1024 training prompts, 2 each; wrong ones dropped (B's rejection sampling)
      "${data[@]}" teacher-rollouts data.n_problems=1024 data.n=2 data.max_new_tokens=96 data.drop_incorrect=true \
        "$@" "${data_args[@]}" hydra.run.dir="$data_dir"
      ;;
    sft)
      # 300 steps x 64 rows: the student needs about as many steps as the teacher's build to take up its wording
      # (60 steps left it writing garbage: held-out accuracy 0.000)
      "${train[@]}" loss=sft rollout=dataset rollout.path="$data_dir/data" rollout.n=1 rollout.max_new_tokens=96 \
        trainer.prompts_per_step=64 trainer.max_steps=300 trainer.lr=1e-3 trainer.lr_schedule=cosine \
        trainer.warmup_steps=10 eval.every=100 eval.max_new_tokens=96 logger=none "$@" "${sft_args[@]}" hydra.run.dir="$dir/sft"
      ;;
    opd)
      # the SFT run's last checkpoint (a run saves one at its last step)
      ckpt=$(ls -d "$dir"/sft/checkpoints/step_*/model 2>/dev/null | sort | tail -n 1 || true)
      [[ -n $ckpt ]] || { echo "error: $dir/sft has no checkpoint: run the sft stage first" >&2; exit 2; }
      "${train[@]}" model.name_or_path="$ckpt" trainer.max_steps=200 eval.every=100 logger=none \
        rollout.max_new_tokens=96 eval.max_new_tokens=96 \
        "$@" "${opd_args[@]}" hydra.run.dir="$dir/opd"
      ;;
    *)
      echo "error: STAGES: unknown stage '$stage'; stages are: data sft opd" >&2
      exit 2
      ;;
  esac
done
