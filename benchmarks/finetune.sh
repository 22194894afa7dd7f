#!/usr/bin/env bash
# Fine-tuning study: how much of its own domain a trained base forgets when adapted to new text.
#
#   bash benchmarks/finetune.sh RUN_DIR [OUT_DIR]
#
# RUN_DIR: a FractalMoE run, the default `fractalmoe train` run (e.g. runs/default). Results:
# $RESULTS/finetune.jsonl (one `fractalmoe finetune --json` object per run, tagged with study,
# method and domain), then `python benchmarks/finetune_table.py $RESULTS/finetune.jsonl` prints
# the tables. Finished runs are skipped on a rerun (their JSON is kept under OUT_DIR/json).
#
# New domains, both needing no download at run time:
#   email: Python's email package source, from this interpreter's standard library.
#   kjv:   the King James Bible (4.3 MB of English prose), from Debian's bible-kjv package:
#            apt-get install -y bible-kjv
#            bible -l80 "Genesis1:1-Revelation22:21" > kjv.txt   # sha256 ba7c84a7...96d5
#          (-l80 fixes the line width, so the text does not depend on the terminal).
#
# Methods, each at the learning rates LR_POINTS picks from its grid below, seeds 2 and 3, $STEPS steps,
# same data:
#   fhme       FHME adapters matched to LoRA's trainable parameters (--match-lora-rank $RANK)
#   memory     the base's own FHME tables, only the rows the new domain uses far more than the
#              base (as many as LoRA's trainable parameters: --match-lora-rank $RANK)
#   memory-step  memory with the rows chosen anew at every step from that step's batch (--rows-per-step)
#   memory-step-rows  memory-step with $ROWS rows a layer learning at each step (--sparse-rows $ROWS;
#              tables name it memory-step-rows-$ROWS)
#   memory-gain-sgd  memory-step with the rows of most new-domain gradient per base read, each
#              stepped by plain SGD over its base reads (--rows-by-gain)
#   memory-step-embed  memory-step with the byte embeddings learning too (--with-embeddings), table
#              lr 0.1, the grid's lr the embeddings'
#   memory-step-rows-embed  memory-step-rows with the embeddings learning, table lr 0.03
#   memory-sgd   memory with its rows learning by plain SGD (expert_optim = row_sgd) instead of lazy Adam
#   memory-step-sgd  memory-step with plain SGD
#   lora       LoRA at rank $RANK (<= width / 2) on every dense projection
#   full       every weight
#   fhme-gate  fhme with --output-gate (learned gate on each adapter's output, shut at start)
#   fhme-domain-gate  fhme with --domain-gate (each adapter behind a domain gate fitted on both domains)
#   fhme-lora16-gate  fhme of 1 x top-12 with LoRA of rank 16 on attention, every update behind a gate
#                     (a second stage: the FFN adapters alone, gated; gated LoRA takes no more LoRA)
#   fhme-reroute      fhme of 1 head x top-15 with --reroute (the base's routers' query projections learn too)
#   fhme-rows  fhme with --sparse-rows $ROWS (only the rows the new domain uses far more than the base)
# Sequential: email, then kjv starting from the email run (middle learning rate): retention on the
# base domain and on email. GPT-2: a transformers GPT-2 base trained here, adapted to email by
# GPT2_METHODS (default: fhme lora full; also rows: value memories with frozen random routing whose
# rows no sampled base window read learn, LoRA's count of rows a step), each over its gpt2_grid.
# Needs `pip install -e .[hf]` (transformers, peft). Environment overrides: STEPS, SEEDS, RANK,
# ROWS, METHODS, DOMAINS, STUDIES (any of: single sequential gpt2), LR_POINTS (which of the five
# grid points, default the middle three "2 3 4"), EVAL_BYTES (evaluate on that
# prefix of each validation split), DEVICE, RESULTS, GPT2_STEPS (training steps of the GPT-2 base).
set -euo pipefail
BASE=${1:?usage: bash benchmarks/finetune.sh RUN_DIR [OUT_DIR]}
OUT=${2:-runs/finetune_study}
RESULTS=${RESULTS:-benchmarks/results/finetune}
F=${F:-.venv/bin/fractalmoe}
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-150}
SEEDS=${SEEDS:-"2 3"}
RANK=${RANK:-64}
ROWS=${ROWS:-64}
DEVICE=${DEVICE:-cpu}
METHODS=${METHODS:-"memory fhme lora full fhme-gate fhme-rows"}
DOMAINS=${DOMAINS:-"email kjv"}
STUDIES=${STUDIES:-"single sequential gpt2"}
GPT2_STEPS=${GPT2_STEPS:-1200}
GPT2_METHODS=${GPT2_METHODS:-"fhme lora full"}
LR_POINTS=${LR_POINTS:-"2 3 4"}
EVAL=${EVAL_BYTES:+--eval-bytes $EVAL_BYTES}
mkdir -p "$OUT/json" "$OUT/data" "$RESULTS"

# --- domains ----------------------------------------------------------------------------------
EMAIL=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/email
KJV=$OUT/data/kjv.txt
if [[ " $DOMAINS " == *" kjv "* || " $STUDIES " == *" sequential "* ]] && [ ! -s "$KJV" ]; then
  if ! command -v bible > /dev/null; then
    apt-get install -y bible-kjv > /dev/null || { echo "install Debian's bible-kjv package (apt-get install -y bible-kjv)" >&2; exit 2; }
  fi
  bible -l80 "Genesis1:1-Revelation22:21" > "$KJV"
fi
if [ -s "$KJV" ]; then
  sum=$(sha256sum "$KJV" | cut -c1-64)
  [ "$sum" = ba7c84a755b5ecc052222311dc2d785cd6cf9c0875ca26fc31de1138501496d5 ] ||
    echo "note: $KJV differs from the text the study was written with (sha256 $sum)" >&2
fi
declare -A DATA=([email]=$EMAIL [kjv]=$KJV)

# --- learning rates: "lr:expert_lr", half-decade steps; LR_POINTS picks which of the five ------
# The middle (third) point starts the sequential study's second stage.
grid() {
  case $1 in
    fhme*) echo "3e-4:0.005 1e-3:0.0167 3e-3:0.05 1e-2:0.15 3e-2:0.45" ;;
    memory-step-embed) echo "3e-5:0.1 1e-4:0.1 3e-4:0.1 1e-3:0.1 3e-3:0.1" ;;  # the embeddings' lr varies
    memory-step-rows-embed) echo "3e-5:0.03 1e-4:0.03 3e-4:0.03 1e-3:0.03 3e-3:0.03" ;;
    *-sgd) echo "3e-4:10 1e-3:30 3e-3:100 1e-2:300 3e-2:1000 1e-1:3000 3e-1:9000" ;;  # steps scale with the gradient (~1e-4 an entry): two more points
    memory*) echo "3e-4:0.01 1e-3:0.03 3e-3:0.1 1e-2:0.3 3e-2:1.0" ;;  # only the expert lr acts: nothing dense trains
    lora) echo "3e-4:0.05 1e-3:0.05 3e-3:0.05 1e-2:0.05 3e-2:0.05" ;;
    full) echo "3e-5:0.0015 1e-4:0.005 3e-4:0.015 1e-3:0.05 3e-3:0.15" ;;
  esac
}
lrs() { local g; read -ra g <<< "$(grid "$1")"; for i in $LR_POINTS; do echo "${g[i - 1]}"; done; }
gpt2_grid() {  # the gentle end too, where rows that only the new domain reads land
  case $1 in
    rows) echo "1e-3:0.1 1e-3:0.3 1e-3:1.0" ;;  # the table's rate acts (the joins' own at 1e-3)
    lora) echo "3e-5:0.05 1e-4:0.05 $(lrs lora)" ;;
    full) echo "1e-5:0.0005 $(lrs full)" ;;
    *) lrs "$1" ;;
  esac
}
middle() { grid "$1" | cut -d' ' -f3; }
flags() {
  case $1 in
    fhme) echo "--adapter fhme --match-lora-rank $RANK" ;;
    memory) echo "--adapter memory --match-lora-rank $RANK" ;;
    memory-step) echo "--adapter memory --match-lora-rank $RANK --rows-per-step" ;;
    memory-step-rows) echo "--adapter memory --sparse-rows $ROWS --rows-per-step" ;;
    memory-step-embed) echo "--adapter memory --match-lora-rank $RANK --rows-per-step --with-embeddings" ;;
    memory-step-rows-embed) echo "--adapter memory --sparse-rows $ROWS --rows-per-step --with-embeddings" ;;
    memory-gain-sgd) echo "--adapter memory --match-lora-rank $RANK --rows-per-step --rows-by-gain --set expert_optim=row_sgd" ;;
    memory-sgd) echo "--adapter memory --match-lora-rank $RANK --set expert_optim=row_sgd" ;;
    memory-step-sgd) echo "--adapter memory --match-lora-rank $RANK --rows-per-step --set expert_optim=row_sgd" ;;
    fhme-gate) echo "--adapter fhme --match-lora-rank $RANK --output-gate" ;;
    fhme-domain-gate) echo "--adapter fhme --match-lora-rank $RANK --domain-gate" ;;
    fhme-lora16-gate) echo "--adapter fhme --match-lora-rank $RANK --heads 1 --topk 12 --attention-lora 16 --domain-gate" ;;
    fhme-reroute) echo "--adapter fhme --match-lora-rank $RANK --reroute --heads 1 --topk 15" ;;
    fhme-rows) echo "--adapter fhme --match-lora-rank $RANK --sparse-rows $ROWS" ;;
    lora) echo "--adapter lora --lora-rank $RANK" ;;
    full) echo "--adapter full" ;;
  esac
}
stage_flags() {  # STUDY METHOD: a second stage cannot add LoRA where the first stage's sits behind gates
  case "$1:$2" in
    sequential:fhme-lora16-gate) echo "--adapter fhme --experts 225 --heads 1 --topk 12 --domain-gate" ;;  # 269,060 trainable
    *) flags "$2" ;;
  esac
}
label() {  # the method as the tables name it: memory-step-rows with its row count, one curve per count
  case $1 in memory-step-rows*) echo "$1-$ROWS" ;; *) echo "$1" ;; esac
}
tag() {  # add the study's labels to one JSON line
  $PY -c 'import json, sys; r = json.loads(sys.stdin.read().strip().splitlines()[-1]); r.update(json.loads(sys.argv[1])); print(json.dumps(r))' "$1"
}

# finetune NAME BASE_RUN DOMAIN METHOD LR:EXPERT_LR SEED STUDY
finetune() {
  local name=$1 base=$2 domain=$3 method=$4 lr=${5%%:*} elr=${5##*:} seed=$6 study=$7
  [ -s "$OUT/json/$name.json" ] && return 0
  rm -rf "${OUT:?}/$name"
  # shellcheck disable=SC2046
  $F finetune --base "$base" --data "${DATA[$domain]}" $(stage_flags "$study" "$method") --max-steps "$STEPS" $EVAL \
    --set lr="$lr" --set expert_lr="$elr" --set seed="$seed" --device "$DEVICE" \
    --out "$OUT/$name" --quiet --json 2> "$OUT/$name.log" |
    tag "{\"study\": \"$study\", \"base_model\": \"fractalmoe\", \"method\": \"$(label "$method")\", \"domain\": \"$domain\"}" \
    > "$OUT/json/$name.json.tmp"
  mv "$OUT/json/$name.json.tmp" "$OUT/json/$name.json"
  brief "$OUT/json/$name.json"
}
brief() {  # one progress line per finished run
  $PY -c 'import json, sys; r = json.load(open(sys.argv[1])); k = ("val_bpb_before", "val_bpb", "base_val_bpb_before", "base_val_bpb"); print(sys.argv[1] + ": new %.4f -> %.4f, base %.4f -> %.4f" % tuple(r[x] for x in k))' "$1"
}

# --- one new domain at a time -----------------------------------------------------------------
for domain in $DOMAINS; do
  [[ " $STUDIES " == *" single "* ]] || break
  for method in $METHODS; do
    for lr in $(lrs "$method"); do
      for seed in $SEEDS; do
        finetune "${domain}_${method}_lr${lr%%:*}_s$seed" "$BASE" "$domain" "$method" "$lr" "$seed" single
      done
    done
  done
done

# --- sequential: email, then kjv from the email run -------------------------------------------
for method in $METHODS; do
  [[ " $STUDIES " == *" sequential "* ]] || break
  lr=$(middle "$method")
  for seed in $SEEDS; do
    finetune "seq_kjv_after_email_${method}_s$seed" "$OUT/email_${method}_lr${lr%%:*}_s$seed" kjv "$method" \
      "$lr" "$seed" sequential
  done
done

# --- GPT-2 architecture base, adapted to email ------------------------------------------------
G=benchmarks/finetune_gpt2.py
if [[ " $STUDIES " == *" gpt2 "* ]]; then
[ -s "$OUT/gpt2_base/fractalmoe_base.json" ] || $PY $G base --out "$OUT/gpt2_base" --steps "$GPT2_STEPS" --device "$DEVICE" > "$OUT/json/gpt2_base.json"
for method in $GPT2_METHODS; do
  for lr in $(gpt2_grid "$method"); do
    for seed in $SEEDS; do
      name="gpt2_email_${method}_lr${lr%%:*}_s$seed"
      [ "$method" = rows ] && name="gpt2_email_rows_xlr${lr##*:}_s$seed"
      [ -s "$OUT/json/$name.json" ] && continue
      $PY $G finetune --base "$OUT/gpt2_base" --data "$EMAIL" --adapter "$method" --lora-rank "$RANK" \
        --lr "${lr%%:*}" --expert-lr "${lr##*:}" --seed "$seed" --max-steps "$STEPS" $EVAL --device "$DEVICE" \
        2> "$OUT/$name.log" | tag "{\"study\": \"single\", \"method\": \"$method\", \"domain\": \"email\"}" \
        > "$OUT/json/$name.json.tmp"
      mv "$OUT/json/$name.json.tmp" "$OUT/json/$name.json"
      brief "$OUT/json/$name.json"
    done
  done
done
cp "$OUT/json/gpt2_base.json" "$RESULTS/finetune_gpt2_base.json"
fi

cat "$OUT"/json/*_s[0-9]*.json > "$RESULTS/finetune.jsonl"
$PY benchmarks/finetune_table.py "$RESULTS/finetune.jsonl" | tee "$RESULTS/finetune_tables.md"
