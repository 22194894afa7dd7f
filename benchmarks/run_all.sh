#!/usr/bin/env bash
# Every committed result under benchmarks/results, with the command that produced it.
# Run from the repository root after `make install` and `pip install -e .[bench]`, on an otherwise
# idle machine (two PyTorch processes on 2 cores slow each other down 10-100x).
set -euo pipefail
F=.venv/bin/fractalmoe
R=benchmarks/results
mkdir -p $R runs
STD=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/email

# Training product: the default run (make train)
# (recorded with row-wise Adagrad tables and 1,200 steps, the default then; `fractalmoe train` now
# uses lazy Adam and 2,400 steps)
ADAGRAD="--set expert_optim=rowwise_adagrad --set expert_lr=0.05"
/usr/bin/time -v $F train --out runs/default --max-steps 1200 $ADAGRAD 2> $R/default_train/time.txt
$F eval --ckpt runs/default --json > $R/default_train/eval.json

# Quality: the search of equal size per model, then the reported comparison on both corpora
$F corpus stdlib --out data/stdlib
.venv/bin/python benchmarks/quality.py search
.venv/bin/python benchmarks/quality.py final
.venv/bin/python benchmarks/quality_tables.py runs/quality > $R/quality/tables.md

# Million-expert scaling (one layer, dim 256, 8 heads x top-16, 2048 tokens, fp32); the default
# recipe against nanoGPT's at equal wall-clock; per-rank memory of sharded training and resume
bash benchmarks/bench_layer.sh
$F bench layer --experts 1048576 --impl fractalmoe-lazy-adam,peer-pytorch-sparse --wait-idle 600 --json > $R/layer_1m_same_rule.jsonl
$F bench layer --experts 1048576 --impl fractalmoe,peer-pytorch --wait-idle 600 --json > $R/layer_1m_default_rule.jsonl
$F bench layer --experts 4194304 --impl fractalmoe --wait-idle 600 --json > $R/layer_4m.jsonl
$F bench layer --experts 16384,1048576 \
  --impl fractalmoe,fractalmoe-deferred,fractalmoe-lazy-adam-deferred,peer-pytorch-sparse,peer-pytorch \
  --repeats 3 --wait-idle 600 --json > $R/layer_deferred.jsonl 2> $R/layer_deferred.txt
$F bench layer --experts 16384,1048576 --impl fractalmoe-lazy-adam,fractalmoe-lazy-adam-deferred,fractalmoe,\
fractalmoe-deferred,peer-pytorch-sparse,peer-pytorch --repeats 3 --wait-idle 600 --json \
  > $R/layer_rules.jsonl 2> $R/layer_rules.txt
# The one-kernel lazy-Adam update (fused_row_update) against the eager one, then beside the rest
$F bench layer --experts 1048576 --impl fractalmoe-lazy-adam-deferred,fractalmoe-lazy-adam-fused,fractalmoe-deferred \
  --repeats 5 --wait-idle 600 --json > $R/layer_fused_ab.jsonl 2> $R/layer_fused_ab.txt
$F bench layer --experts 16384,1048576 --impl fractalmoe-lazy-adam,fractalmoe-lazy-adam-deferred,\
fractalmoe-lazy-adam-fused,fractalmoe,fractalmoe-deferred,peer-pytorch-sparse,peer-pytorch --repeats 3 --wait-idle 600 \
  --json > $R/layer_fused_rules.jsonl 2> $R/layer_fused_rules.txt
$F bench layer --experts 16384,1048576 --impl fractalmoe-deferred,fractalmoe-lazy-adam-fused --key-parts 4 \
  --repeats 3 --wait-idle 600 --json > $R/layer_key_parts.jsonl 2> $R/layer_key_parts.txt
# bfloat16 against float32 tables, alternated in one run
$F bench layer --experts 16384,1048576 --impl fractalmoe-deferred --key-parts 4 --expert-dtype float32,bfloat16 \
  --repeats 5 --wait-idle 600 --json > $R/layer_dtype.jsonl 2> $R/layer_dtype.txt
# bfloat16 tables rounded stochastically against rounded to nearest
$F bench layer --experts 16384,1048576 --impl fractalmoe-deferred,fractalmoe-deferred-sr --expert-dtype bfloat16 \
  --repeats 3 --wait-idle 600 --json > $R/layer_bf16_rounding.jsonl 2> $R/layer_bf16_rounding.txt
# Every ratio beside its ceiling (the other step over the first's roofline floor): the default rule's
# paths and row-wise Adagrad against PEER-pytorch with either rule
$F bench layer --experts 16384,1048576 --impl fractalmoe-deferred,fractalmoe-lazy-adam,fractalmoe-lazy-adam-fused,\
peer-pytorch-sparse,peer-pytorch --repeats 3 --wait-idle 600 --json > $R/layer_ceilings.jsonl 2> $R/layer_ceilings.txt
LAST=1 STEPS=1200 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_vs_default   # the earlier default (results/nanogpt_race)
# The gate + convolution default, pinned to core 0 while core 1 ran shape-pilots (results/nanogpt_race_gate_conv)
LAST=1 STEPS=1200 CPU=0 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_race_gc
# The block-convolution default, pinned to core 0 while core 1 ran pilots and tests (results/nanogpt_race_block_conv)
LAST=1 STEPS=1200 CPU=0 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_race_bconv
# The same default at seeds 2 and 3, side by side (one race per core) (results/nanogpt_race_seeds)
LAST=1 STEPS=1200 SEED=2 CPU=0 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_race_s2 &
LAST=1 STEPS=1200 SEED=3 CPU=1 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_race_s3; wait
# seeds 1337 and 4 the same way; then the recipe alone at seeds 2 and 3 with the script's 1.1x schedule,
# against a copy of that seed's default run (its wall-clock from the seed's race.log)
LAST=1 STEPS=1200 CPU=0 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_race_s1337 &
LAST=1 STEPS=1200 SEED=4 CPU=1 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_race_s4; wait
for s in s2 s3; do mkdir -p runs/nanogpt_race_${s}_fair; cp -r runs/nanogpt_race_$s/default runs/nanogpt_race_${s}_fair/; done
LAST=1 WALL=1332.29 SEED=2 CPU=0 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_race_s2_fair &
LAST=1 WALL=1337.53 SEED=3 CPU=1 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_race_s3_fair; wait
# seeds 1337 and 4 again with the whole-row top-k sort and kept host memory (results/nanogpt_race_seeds/*_fast),
# then with train deferring the gradients of tables read more than once a step (*_deferred)
LAST=1 STEPS=1200 CPU=0 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_race_s1337_fast &
LAST=1 STEPS=1200 SEED=4 CPU=1 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_race_s4_fast; wait
LAST=1 STEPS=1200 CPU=0 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_race_s1337_deferred &
LAST=1 STEPS=1200 SEED=4 CPU=1 bash benchmarks/nanogpt_recipe.sh runs/nanogpt_race_s4_deferred; wait
# The pilot that chose 2,400 steps for the default (seed 1; results/default_long_pilot)
$F train --out runs/long_pilot_s1 --seed 1 --max-steps 2400 --quiet
$F eval --ckpt runs/long_pilot_s1 --json > $R/default_long_pilot/eval.json
# the races above ran the default of 1,200 steps and scored the recipe at its last step; the
# default's 2,400 steps, seeds 1337 and 4 the same way (results/nanogpt_race_seeds/*_long), then the
# recipe alone against those default runs, keeping its best checkpoint (the script's default now; *_long_best)
LAST=1 CPU=0 bash benchmarks/nanogpt_recipe.sh runs/race_long_s1337 &
LAST=1 SEED=4 CPU=1 bash benchmarks/nanogpt_recipe.sh runs/race_long_s4; wait
for s in 1337 4; do mkdir -p runs/race_long_best_s$s; cp -r runs/race_long_s$s/default runs/race_long_best_s$s/; done
WALL=1446.12 CPU=0 bash benchmarks/nanogpt_recipe.sh runs/race_long_best_s1337 &
WALL=1462.87 SEED=4 CPU=1 bash benchmarks/nanogpt_recipe.sh runs/race_long_best_s4; wait
# Can the base tell its own domain from email per token (routing novelty, a linear probe)? Before a gated adapter
.venv/bin/python benchmarks/domain_separation.py runs/long_pilot_s1 > $R/domain_separation.json
bash benchmarks/sharded_rss.sh
/usr/bin/time -v $F train --config configs/million.toml --out runs/million --quiet > $R/million_train.log 2>&1
/usr/bin/time -v $F train --config configs/million.toml --set deferred_table_grads=false --out runs/million_sparse \
  --quiet > $R/million_train_sparse.log 2>&1
$F bench layer --experts 16777216 --dim 128 --key-dim 128 --expert-dtype bfloat16 --impl fractalmoe --json > $R/layer_16m.jsonl
/usr/bin/time -v $F train --config configs/million.toml --set n_layers=1 --set num_experts=16777216 \
  --set expert_dtype=bfloat16 --out runs/train_16m --quiet 2> $R/train_16m/time.txt

# Top-k selection on a CPU: torch.topk vs numpy's selection and whole-row sort, per call and per default step
.venv/bin/python benchmarks/topk_speed.py --out $R/topk_speed.jsonl
# Freed host memory returned to the OS vs kept for reuse, per default training step
.venv/bin/python benchmarks/host_memory.py --out $R/host_memory.jsonl
# Table gradients as a sparse .grad vs deferred, per training step of models that read a table often
.venv/bin/python benchmarks/table_grad_speed.py --out $R/table_grad_speed.jsonl
.venv/bin/python benchmarks/block_conv_speed.py --out $R/block_conv_speed.jsonl

# Adaptive depth: the threshold rule against fixed depths (bpb vs blocks/token frontier)
bash benchmarks/adaptive_frontier.sh
# ... and in a 1-layer model of the quality comparison's value blocks (600 steps, seed 1)
EXTRA="--set n_layers=1 --set block=value --set topk=40 --set key_dim=16 --set join_bias=0 --set train.expert_optim=lazy_adam --set train.expert_lr=0.03" \
  RESULTS=$R/adaptive_frontier/one_layer RUNS="fixed_c1 fixed_c2 fixed_c3 threshold_t25 threshold_t45 threshold_t65" \
  bash benchmarks/adaptive_frontier.sh runs/adapt_l1
# ... and on the standard-library corpus at 1,200 steps, seeds 2 and 3 side by side (one core each), the
# frontier on the first 256 KB of its validation split
for s in 2 3; do
  CPU=$((s - 2)) SEED=$s EXTRA="--data data/stdlib --max-steps 1200" EVAL_BYTES=262144 PASSES=1 \
    RUNS="fixed_c1 fixed_c2 fixed_c3 threshold_t25 threshold_t45 threshold_t65" \
    DEPTH_TEXT="$(head -c 800 data/stdlib/val.txt)" RESULTS=$R/adaptive_frontier/stdlib_1200/seed$s \
    bash benchmarks/adaptive_frontier.sh runs/adapt_stdlib_s$s &
done
wait
# ... and on the bundled corpus at 1,200 steps, seeds 2 and 3 side by side
for s in 2 3; do
  CPU=$((s - 2)) SEED=$s EXTRA="--max-steps 1200" PASSES=1 \
    RUNS="fixed_c1 fixed_c2 fixed_c3 threshold_t25 threshold_t45 threshold_t65" \
    RESULTS=$R/adaptive_frontier/bundled_1200/seed$s bash benchmarks/adaptive_frontier.sh runs/adapt_bundled_s$s &
done
wait
# Do the two seeds agree on which tokens gain from depth? (their fixed C = 1, 2, 3 models, token by token)
.venv/bin/python benchmarks/depth_benefit.py --a runs/adapt_bundled_s2/fixed_c{1,2,3} \
  --b runs/adapt_bundled_s3/fixed_c{1,2,3} > $R/depth_benefit_bundled_1200.json
# ... and on the standard library: the same fixed models at 600 steps, first 256 KB of the validation split
for s in 2 3; do
  BENCH=0 SEED=$s EXTRA="--data data/stdlib --max-steps 600" RUNS="fixed_c1 fixed_c2 fixed_c3" \
    bash benchmarks/adaptive_frontier.sh runs/adapt_stdlib600_s$s
done
.venv/bin/python benchmarks/depth_benefit.py --a runs/adapt_stdlib600_s2/fixed_c{1,2,3} \
  --b runs/adapt_stdlib600_s3/fixed_c{1,2,3} --windows 2048 > $R/depth_benefit_stdlib_600.json
# Time to quality: the full-depth model and the 45% model (1,500 steps), one after the other, alone
for s in 2 3; do SEED=$s bash benchmarks/adaptive_time_to_quality.sh runs/adapt_time; done
# Adaptive depth (C = 3) with compacted training, ponder rule: the adaptive model, the same config at full
# depth, bench adaptive, the depth map on held-out text
A=$R/adaptive_compacted
PONDER="--set depth_rule=ponder --set depth_explore=0.25"  # the rule of these two studies
$F train --config configs/adaptive.toml $PONDER --out runs/adaptive_target --quiet
$F train --config configs/adaptive.toml --set adaptive_depth=false --set depth_explore=0 --set depth_target=0 --out runs/adaptive_target_full --quiet
$F bench adaptive --ckpt runs/adaptive_target --json > $A/adaptive_target_bench.jsonl
$F bench adaptive --ckpt runs/adaptive_target_full --json > $A/full_bench.jsonl
$F plot runs/adaptive_target --out $A/adaptive_target_plots --depth-map --text "$(tail -c 1000 src/fractalmoe/tinyshakespeare.txt | head -c 800)"
# Quality pilots of this study: untied routers, expert-table optimizers; the deep path's reads
.venv/bin/python benchmarks/quality.py untie-pilots
.venv/bin/python benchmarks/quality.py usage-pilots
.venv/bin/python benchmarks/quality.py optim-pilots
# Reported quality runs after the pilots (1,200 steps): optimizers, lazy-Adam comparison, 65K
# balance, the experts study, the one-head shape against PKM and routing once per column (second corpus: data/stdlib),
# shallower models, the SiLU output gate, the query convolution, adaptive-depth FHME against PKM shapes,
# the pilots of the gate + convolution default, PEER with the convolution, block convolutions, 65K
# against 262K experts at 2,400 steps, heads per column (4 layers, then 1 layer), memory in some layers,
# the experts series with three-part product keys, PKM with three-part keys at 262K, one or three heads for both,
# the block-conv pair at the default's 2,400 steps, and on a 1 MB cut of the standard library and the
# King James Bible (Debian's bible-kjv), and the pair with a regulariser (the memory's value dropout at
# seed 1; the transformer's dropout at seeds 2, 3), the default FHME at 65K with balancing on the
# second corpus (a balance loss that fades out early too, and the pair at 16K with and without it),
# the deep path's second read querying with what the first read found, and the fading loss offered
# to both at 16K on the bundled corpus (600 steps), then FHME with it against PKM without, seeds 2, 3;
# C = 1, 2, 3 at a budget that fits C = 3; last, the block-conv pair at width 256 on both corpora,
# the same search of dense learning rates for both at width 256 (600 steps), the pair at the rate it
# chose, and the same search at width 128; then C = 2 against C = 1 (PEER) with neuron blocks (600 steps),
# and fractal-budget's C = 2 and PKM at 2,400 steps (seeds 2, 3)
for phase in optim final-lazy balance-65k experts one-head-pilots one-head route-once-pilots route-once \
             shallow-pilots shallow gate-pilots gated conv-pilots conv gate-conv adaptive-pilots \
             table-lr-pilots shape-pilots peer-conv conv-width-pilots conv-width shared-bank-pilots \
             drop-path-pilots sigmoid-gate-pilots block-conv-pilots block-conv experts-long-pilots \
             column-heads-pilots column-heads shallow-heads column-heads-seed4 routed-layers-pilots key-parts key-parts-pkm \
             key-parts-heads-pilots default-length small-stdlib small-corpus-seed4 kjv read-once-seed4 value-dropout-pilots dropout \
             balance-65k-stdlib-pilots balance-65k-stdlib balance-65k-layers balance-65k-long \
             deep-query-pilots balance-65k-fade fade-16k fade-pilots fade fade-base fractal-budget bf16-tables \
             balance-65k-target balance-65k-target-ratio balance-65k-target-slow \
             balance-65k-target-slow-0.5 balance-65k-target-slow-seed3 balance-65k-target-slow-layers \
             width-256 width-256-lr-pilots width-256-tuned lr-pilots repeat-rows-pilots \
             repeat-rows-1-layer-pilots one-layer neuron-fractal-pilots \
             fractal-budget-long-pilot; do
  .venv/bin/python benchmarks/quality.py $phase
done
# Expert usage of the 65K runs with and without a balancing measure, over each block's first 10^6 choices
for run in runs/quality/optim/n65536_lazy_adam_s2 runs/quality/balance-65k/*_s2; do
  $F eval --ckpt $run/runs/fhme-seed2 --usage-choices 1000000 --json > $R/quality/$(basename $(dirname $run))/$(basename $run)/usage_1m_choices.json
done
# ... and of the default FHME at 65K on the second corpus, with and without balancing (one weight,
# or one per layer, or fading out, or steered to a usage target; 1,200 and 2,400 steps)
for run in runs/quality/balance-65k-stdlib-pilots/*_s1 runs/quality/balance-65k-stdlib/*_s2 \
           runs/quality/balance-65k-layers/*_s? runs/quality/balance-65k-long/*_s? runs/quality/balance-65k-fade/*_s? \
           runs/quality/balance-65k-target/*_s? runs/quality/balance-65k-target-ratio/*_s? \
           runs/quality/balance-65k-target-slow*/*_s?; do
  $F eval --ckpt $run/runs/fhme-seed${run##*_s} --data data/stdlib --usage-choices 1000000 --json \
    > $R/quality/$(basename $(dirname $run))/$(basename $run)/usage_1m_choices.json
done
.venv/bin/python benchmarks/quality_tables.py benchmarks/results/quality > $R/quality/tables.md
# Memory fine-tuning against LoRA and full (base: the optimizer study's lazy-Adam run, seed 2),
# and the transformers GPT-2 base
METHODS="memory lora full" STUDIES="single sequential" LR_POINTS="2 3 4 5" EVAL_BYTES=262144 \
  RESULTS=$R/finetune_memory bash benchmarks/finetune.sh runs/quality/optim/n16384_lazy_adam_s2/runs/fhme-seed2 runs/ft_memory
STUDIES=gpt2 LR_POINTS="1 2 3 4 5" EVAL_BYTES=262144 RESULTS=$R/finetune_gpt2 bash benchmarks/finetune.sh runs/default runs/ft_memory
# Memory fine-tuning's rows by plain SGD against lazy Adam, LoRA and full, on a base with today's defaults
$F train --seed 2 --max-steps 1200 --out runs/ft_base_s2 --quiet
for spec in "memory-sgd:1 2 3 4 5 6 7" "memory:2 3 4 5" "lora full:1 2 3 4 5"; do
  METHODS="${spec%%:*}" LR_POINTS="${spec##*:}" SEEDS=2 DOMAINS=email STUDIES=single EVAL_BYTES=262144 \
    RESULTS=$R/finetune_sgd bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_sgd
done
# Rows chosen per step, since a row mask drops the rows it leaves out, against LoRA and full on a
# base of the same command retrained by today's code (runs whose curves bracket memory-step's)
for spec in "memory-step:2 3 4 5" "lora:1 2 3" "full:1 2 3"; do
  METHODS="${spec%%:*}" LR_POINTS="${spec##*:}" SEEDS=2 DOMAINS=email STUDIES=single EVAL_BYTES=262144 \
    RESULTS=$R/finetune_rows_fixed bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_rows_fixed
done
# ... and on the second new domain, the King James Bible (learnt faster: memory-step from lr 0.01)
for spec in "memory-step:1 2 3 4" "lora:1 2 3" "full:1 2"; do
  METHODS="${spec%%:*}" LR_POINTS="${spec##*:}" SEEDS=2 DOMAINS=kjv STUDIES=single EVAL_BYTES=262144 \
    RESULTS=$R/finetune_rows_fixed bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_rows_fixed
done
.venv/bin/python benchmarks/finetune_table.py $R/finetune_rows_fixed/finetune.jsonl \
  --levels email:3.8 email:3.5 kjv:2.4 kjv:2.3 kjv:2.2 > $R/finetune_rows_fixed/finetune_tables.md
# Other rules for the rows of each step, on the same base (pilots, seed 2): a quarter as many rows
# (148 a layer), and the rows of most new-domain gradient per base read, stepped by SGD over their reads
METHODS=memory-step-rows ROWS=148 LR_POINTS="4" SEEDS=2 DOMAINS=email STUDIES=single EVAL_BYTES=262144 \
  RESULTS=$R/finetune_rows_pilots bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_rows_t148
METHODS=memory-gain-sgd LR_POINTS="4 5" SEEDS=2 DOMAINS=email STUDIES=single EVAL_BYTES=262144 \
  RESULTS=$R/finetune_rows_pilots bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_rows_gain
# ... and the byte embeddings learning beside the rows (table lr 0.1, embeddings' lr 1e-4 … 3e-3),
# on both domains
for domain in email kjv; do
  METHODS=memory-step-embed LR_POINTS="2 3 4 5" SEEDS=2 DOMAINS=$domain STUDIES=single EVAL_BYTES=262144 \
    RESULTS=$R/finetune_rows_pilots bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_rows_embed
done
# More rows a step than LoRA's budget allows: 4x (2,368 a layer) on both domains, and every row
# (16,384) on email
METHODS=memory-step-rows ROWS=2368 LR_POINTS="1 2 3" SEEDS=2 DOMAINS=email STUDIES=single EVAL_BYTES=262144 \
  RESULTS=$R/finetune_rows_pilots bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_rows_t2368
METHODS=memory-step-rows ROWS=2368 LR_POINTS="1 2" SEEDS=2 DOMAINS=kjv STUDIES=single EVAL_BYTES=262144 \
  RESULTS=$R/finetune_rows_pilots bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_rows_t2368
METHODS=memory-step-rows ROWS=16384 LR_POINTS="1" SEEDS=2 DOMAINS=email STUDIES=single EVAL_BYTES=262144 \
  RESULTS=$R/finetune_rows_pilots bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_rows_t16384
# ... and 2,368 rows with the embeddings (table lr 0.03, embeddings' 3e-4)
METHODS=memory-step-rows-embed ROWS=2368 LR_POINTS="3" SEEDS=2 DOMAINS=email STUDIES=single EVAL_BYTES=262144 \
  RESULTS=$R/finetune_rows_pilots bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_rows_t2368_embed
cat runs/ft_rows_{fixed,t148,gain,embed,t2368,t16384,t2368_embed}/json/*_s2.json |
  grep -v '"study": "sequential"' > $R/finetune_rows_pilots/finetune.jsonl
.venv/bin/python benchmarks/finetune_table.py $R/finetune_rows_pilots/finetune.jsonl \
  --levels email:4.06 email:3.97 email:3.62 email:3.45 email:3.26 email:3.04 email:2.99 email:2.866 email:2.84 \
  kjv:2.4 kjv:2.3 kjv:2.2 kjv:2.16 kjv:2.1 kjv:2.092 \
  > $R/finetune_rows_pilots/finetune_tables.md
# Seed 3 of the email curves the row-count pilots are read against (the same base, fine-tuning seed 3)
for spec in "memory-step:2 3 4" "memory-step-rows:1 2 3" "memory-step-rows-embed:3" "full:1 2 3" "lora:1 2 3" \
  "memory-step-embed:2 3 4 5"; do
  METHODS="${spec%%:*}" ROWS=2368 LR_POINTS="${spec##*:}" SEEDS=3 DOMAINS=email STUDIES=single EVAL_BYTES=262144 \
    RESULTS=$R/finetune_rows_seeds bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_rows_s3
done
# ... and of the rows with the embeddings on the Bible
METHODS=memory-step-embed LR_POINTS="5 4 3 2" SEEDS=3 DOMAINS=kjv STUDIES=single EVAL_BYTES=262144 \
  RESULTS=$R/finetune_rows_seeds bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_rows_s3
cat runs/ft_rows_fixed/json/email_{memory-step_lr{1e-3,3e-3,1e-2},full_lr*,lora_lr*}_s2.json \
  runs/ft_rows_{t2368,t2368_embed,embed}/json/email_*_s2.json runs/ft_rows_s3/json/email_*_s3.json \
  runs/ft_rows_fixed/json/kjv_{full,lora}_*_s2.json runs/ft_rows_embed/json/kjv_*_s2.json \
  runs/ft_rows_s3/json/kjv_*_s3.json > $R/finetune_rows_seeds/finetune.jsonl
.venv/bin/python benchmarks/finetune_table.py $R/finetune_rows_seeds/finetune.jsonl \
  --levels email:3.97 email:3.62 email:3.45 email:3.26 email:3.04 email:2.99 email:2.866 email:2.84 \
  kjv:2.3 kjv:2.2 kjv:2.16 kjv:2.1 kjv:2.092 > $R/finetune_rows_seeds/finetune_tables.md
# Sequentially, email then the Bible, with the row mask fixed: each method's second stage starts
# from its middle-rate email run above (seeds 2 and 3), 2,368 rows a step from theirs
for seed in 2 3; do
  if [ $seed = 2 ]; then O=runs/ft_rows_fixed O2=runs/ft_rows_t2368; else O=runs/ft_rows_s3 O2=runs/ft_rows_s3; fi
  METHODS="memory-step lora full" SEEDS=$seed STUDIES=sequential EVAL_BYTES=262144 \
    RESULTS=$R/finetune_rows_sequential bash benchmarks/finetune.sh runs/ft_base_s2 $O
  METHODS=memory-step-rows ROWS=2368 SEEDS=$seed STUDIES=sequential EVAL_BYTES=262144 \
    RESULTS=$R/finetune_rows_sequential bash benchmarks/finetune.sh runs/ft_base_s2 $O2
done
cat runs/ft_rows_fixed/json/email_{memory-step_lr3e-3,lora_lr3e-3,full_lr3e-4}_s2.json \
  runs/ft_rows_t2368/json/email_memory-step-rows_lr3e-3_s2.json runs/ft_rows_{fixed,t2368}/json/seq_*_s2.json \
  runs/ft_rows_s3/json/{email_memory-step_lr3e-3,email_lora_lr3e-3,email_full_lr3e-4,email_memory-step-rows_lr3e-3,seq_*}_s3.json \
  > $R/finetune_rows_sequential/finetune.jsonl
.venv/bin/python benchmarks/finetune_table.py $R/finetune_rows_sequential/finetune.jsonl |
  sed -n '/^#### Sequential/,$p' > $R/finetune_rows_sequential/finetune_tables.md  # one rate each: no curves
# Row adapters on a GPT-2 base (retrained by today's code): value memories of a million rows a
# layer beside each MLP, routing frozen, LoRA's count of rows learning a step, only rows no sampled
# base window read; against LoRA and full fine-tuning, down to their gentle rates
STUDIES=gpt2 GPT2_METHODS="rows lora full" LR_POINTS="1 2" EVAL_BYTES=262144 \
  RESULTS=$R/finetune_gpt2_rows bash benchmarks/finetune.sh runs/default runs/ft_gpt2
for args in "" "--all-rows" "--train-router" "--expert-lr 0.3" "--experts 262144 --max-kept-windows 0" \
    "--experts 1048576" "--experts 262144" "--experts 1048576 --max-kept-windows 0" \
    "--experts 262144 --max-kept-windows 0 --expert-lr 0.3" "--experts 262144 --max-kept-windows 2" \
    "--experts 2096704 --max-kept-windows 0 --expert-lr 0.3" \
    "--experts 262144 --max-kept-windows 0 --expert-lr 0.3 --fit-keys" \
    "--experts 1048576 --max-kept-windows 0 --expert-lr 0.3 --fit-keys" \
    "--experts 262144 --max-kept-windows 0 --expert-lr 0.3 --fit-keys --topk 4" \
    "--experts 262144 --max-kept-windows 0 --expert-lr 0.3 --fit-keys --rows 262144" \
    "--experts 1048576 --max-kept-windows 0 --expert-lr 1.0 --fit-keys" \
    "--experts 262144 --max-kept-windows 0 --expert-lr 0.3 --fit-keys --context 4" \
    "--experts 262144 --max-kept-windows 0 --expert-lr 0.3 --seed 3" \
    "--experts 262144 --max-kept-windows 0 --expert-lr 0.3 --seed 3 --fit-keys" \
    "--experts 262144 --max-kept-windows 0 --expert-lr 1.0 --fit-keys" \
    "--experts 262144 --max-kept-windows 0 --expert-lr 1.0"; do
  .venv/bin/python benchmarks/gpt2_row_pilots.py --base runs/ft_gpt2/gpt2_base $args  # (the pilots that chose the rule)
done > $R/finetune_gpt2_rows/pilots.jsonl
.venv/bin/python benchmarks/finetune_table.py $R/finetune_gpt2_rows/finetune.jsonl --levels 4.25 4.15 4.08 4.04 \
  > $R/finetune_gpt2_rows/finetune_tables.md
# Row adapters on a FractalMoE base (the 16K base above): the same in-memory loop for every method
# (benchmarks/finetune_gpt2.py finetune --base RUN), email, seed 2, down to gentle rates
EMAIL=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/email
mkdir -p $R/finetune_fhme_rows
adapt_run() {  # BASE SEED DOMAIN METHOD LR XLR [FLAGS...]: one finetune_gpt2.py run, its JSON line tagged
  # for finetune_table.py; BASE a FractalMoE run or runs/gpt2_base. METHOD's part before any "-" is
  # the adapter (fhme-1x16 -> fhme), except gated: row adapters behind domain gates, any row free
  # to learn, queries learning; gated-fhme: FHME adapters behind domain gates; fhme-reroute: FHME
  # adapters of 1 x top-15 with the base's routers' query projections learning too
  local data=$EMAIL adapter=${4%%-*} extra=""
  [ "$3" = kjv ] && data=runs/ft_rows_fixed/data/kjv.txt  # made by the finetune.sh call above
  [ "$4" = gated ] && adapter=rows extra="--domain-gate --max-kept-windows any --train-queries"
  [ "$4" = gated-fhme ] && adapter=fhme extra="--domain-gate"
  [ "$4" = fhme-reroute ] && extra="--reroute --heads 1 --topk 15"
  extra="$extra ${*:7}"
  .venv/bin/python benchmarks/finetune_gpt2.py finetune --base "$1" --data "$data" --adapter $adapter --lr "$5" \
    --expert-lr "$6" --seed "$2" --eval-bytes 262144 $extra | .venv/bin/python -c 'import json, sys
r = json.loads(sys.stdin.read().splitlines()[-1]); r.update(method=sys.argv[1], domain=sys.argv[2], study="single")
print(json.dumps(r))' "$4" "$3"
}
for spec in rows:1e-3:0.1 rows:1e-3:0.3 rows:1e-3:1.0 full:1e-5:0.0005 full:3e-5:0.0015 full:1e-4:0.005 \
    lora:3e-5:0.05 lora:1e-4:0.05 lora:3e-4:0.05; do
  IFS=: read -r method lr xlr <<< "$spec"
  adapt_run runs/ft_base_s2 2 email $method $lr $xlr
done > $R/finetune_fhme_rows/finetune.jsonl
# ... and the King James Bible, learnt faster: the rows from 0.03
for spec in rows:1e-3:0.03 rows:1e-3:0.1 full:1e-5:0.0005 full:3e-5:0.0015; do
  IFS=: read -r method lr xlr <<< "$spec"
  adapt_run runs/ft_base_s2 2 kjv $method $lr $xlr
done >> $R/finetune_fhme_rows/finetune.jsonl
grep '/kjv_lora_lr' $R/finetune_rows_fixed/finetune.jsonl >> $R/finetune_fhme_rows/finetune.jsonl  # LoRA: the CLI's runs
# A second replicate: a base trained with seed 3, fine-tuned with seed 3, the same rates (LoRA on
# the Bible at the CLI runs' rates, in this loop)
$F train --seed 3 --max-steps 1200 --out runs/ft_base_s3 --quiet
for spec in email:rows:1e-3:0.1 email:rows:1e-3:0.3 email:rows:1e-3:1.0 email:full:1e-5:0.0005 email:full:3e-5:0.0015 \
    email:full:1e-4:0.005 email:lora:3e-5:0.05 email:lora:1e-4:0.05 email:lora:3e-4:0.05 kjv:rows:1e-3:0.03 \
    kjv:rows:1e-3:0.1 kjv:full:1e-5:0.0005 kjv:full:3e-5:0.0015 kjv:lora:3e-4:0.05 kjv:lora:1e-3:0.05 kjv:lora:3e-3:0.05; do
  IFS=: read -r domain method lr xlr <<< "$spec"
  adapt_run runs/ft_base_s3 3 $domain $method $lr $xlr
done >> $R/finetune_fhme_rows/finetune.jsonl
# LoRA's gentle end on the Bible, on the seed-2 base as today's code rebuilds it (runs/ft_base_s2
# retrained by the command above): where LoRA's rise at 2.37 really lies
for lr in 3e-5 1e-4; do
  .venv/bin/python benchmarks/finetune_gpt2.py finetune --base runs/ft_base_s2 --data runs/ft_rows_fixed/data/kjv.txt \
    --adapter lora --lr $lr --expert-lr 0.05 --seed 2 --eval-bytes 262144 | tail -1
done > $R/finetune_fhme_rows/kjv_lora_gentle_rebuilt_base.jsonl
# Pilots (fine-tuning seed 1, same rebuilt base, table lr 1.0): the rows as they are, with sub-keys
# fitted to both domains, with rows read by up to 2 or 8 sampled base windows allowed to learn, and
# fitted sub-keys with up to 2
for extra in "" "--fit-keys" "--max-kept-windows 2" "--fit-keys --max-kept-windows 2" "--max-kept-windows 8"; do
  .venv/bin/python benchmarks/finetune_gpt2.py finetune --base runs/ft_base_s2 --data "$EMAIL" --adapter rows \
    --lr 1e-3 --expert-lr 1.0 --seed 1 --eval-bytes 262144 $extra | tail -1
done > $R/finetune_fhme_rows/pilots.jsonl
# ... and the opened rows on the seed-3 replicate, read against its own LoRA and full curves
for mkw in 8 2; do
  .venv/bin/python benchmarks/finetune_gpt2.py finetune --base runs/ft_base_s3 --data "$EMAIL" --adapter rows \
    --lr 1e-3 --expert-lr 1.0 --seed 3 --eval-bytes 262144 --max-kept-windows $mkw | tail -1
done >> $R/finetune_fhme_rows/pilots.jsonl
.venv/bin/python benchmarks/finetune_table.py $R/finetune_fhme_rows/finetune.jsonl --levels email:4.4 email:4.2 \
  email:4.0 email:3.9 email:3.82 kjv:2.42 kjv:2.39 kjv:2.37 > $R/finetune_fhme_rows/finetune_tables.md
# Row adapters behind domain gates (sparse_rows.DomainGate: each memory's output times the
# posterior, read from a frozen copy of its routing, that the text so far is the new domain's).
# Pilots (fine-tuning seed 1, the rebuilt seed-2 base, email): the gate on the rows as they are,
# with any row free to learn, at a higher table lr, then with the query projections learning at
# three dense / table rates (--gate-off-too: the same adapters measured without their gates)
G=$R/finetune_gated_rows
mkdir -p $G
for spec in "1e-3 1.0 --domain-gate" "1e-3 1.0 --domain-gate --max-kept-windows any" \
    "1e-3 3.0 --domain-gate --max-kept-windows any --gate-off-too" \
    "1e-3 1.0 --domain-gate --max-kept-windows any --train-queries --gate-off-too" \
    "1e-3 0.3 --domain-gate --max-kept-windows any --train-queries --gate-off-too" \
    "3e-3 1.0 --domain-gate --max-kept-windows any --train-queries --gate-off-too" \
    "1e-2 0.3 --domain-gate --max-kept-windows any --train-queries --gate-off-too"; do
  read -r lr xlr extra <<< "$spec"
  .venv/bin/python benchmarks/finetune_gpt2.py finetune --base runs/ft_base_s2 --data "$EMAIL" --adapter rows \
    --lr $lr --expert-lr $xlr --seed 1 --eval-bytes 262144 $extra | tail -1
done > $G/pilots.jsonl
# The study: gated rows at three rates (a fourth on email, where LoRA learns further), both
# replicates (the rebuilt seed-2 base, fine-tuned with seed 2; the seed-3 base); LoRA from 3e-5 to
# 3e-3 (its best rate) and full fine-tuning on the rebuilt seed-2 base, the LoRA rates the seed-3
# base lacked; its other runs are the ones above
for spec in s3:email:gated:1e-4:0.1 s3:email:gated:1e-3:0.3 s3:email:gated:1e-2:0.3 s3:email:lora:1e-3:0.05 \
    s3:email:lora:3e-3:0.05 s2:email:gated:1e-4:0.1 s2:email:gated:1e-3:0.3 s2:email:gated:1e-2:0.3 \
    s2:email:lora:3e-5:0.05 s2:email:lora:1e-4:0.05 s2:email:lora:3e-4:0.05 s2:email:lora:1e-3:0.05 \
    s2:email:lora:3e-3:0.05 s2:email:full:1e-5:0.0005 s2:email:full:3e-5:0.0015 s2:email:full:1e-4:0.005 \
    s3:kjv:gated:1e-4:0.1 s3:kjv:gated:1e-3:0.3 s3:kjv:gated:1e-2:0.3 s2:kjv:gated:1e-4:0.1 s2:kjv:gated:1e-3:0.3 \
    s2:kjv:gated:1e-2:0.3 s2:kjv:lora:3e-4:0.05 s2:kjv:lora:1e-3:0.05 s2:kjv:lora:3e-3:0.05 \
    s2:kjv:full:1e-5:0.0005 s2:kjv:full:3e-5:0.0015 s3:email:gated:3e-2:0.3 s2:email:gated:3e-2:0.3 \
    s3:kjv:lora:3e-5:0.05 s3:kjv:lora:1e-4:0.05 s2:kjv:lora:3e-5:0.05 s2:kjv:lora:1e-4:0.05; do
  IFS=: read -r s domain method lr xlr <<< "$spec"
  adapt_run runs/ft_base_$s ${s#s} $domain $method $lr $xlr
done > $G/finetune.jsonl
grep '"seed": 3' $R/finetune_fhme_rows/finetune.jsonl | grep -v '"method": "rows"' >> $G/finetune.jsonl
# More pilots (fine-tuning seed 1, the rebuilt seed-2 base, email): gated rows in memories of
# 65,536 and 4,096 rows a layer; FHME adapters (LoRA's count, trainable routing) ungated at 1e-2,
# 3e-3 and 3e-2; behind gates read from a copy of the adapters' own 196-row routing (then
# add_domain_gates on the adapters; not kept) at 3e-3 and 1e-2; behind gates of their own
# million-row routing (gate_adapters) at 3e-3; trained ungated, then gated (--gate-after)
for n in 65536 4096; do
  .venv/bin/python benchmarks/finetune_gpt2.py finetune --base runs/ft_base_s2 --data "$EMAIL" --adapter rows \
    --lr 1e-2 --expert-lr 0.3 --seed 1 --eval-bytes 262144 --domain-gate --max-kept-windows any --train-queries \
    --gate-off-too --experts $n | tail -1
done >> $G/pilots.jsonl
for spec in "1e-2 0.15" "3e-3 0.05" "3e-2 0.45" "3e-3 0.05 --domain-gate --gate-off-too" "3e-3 0.05 --gate-after"; do
  read -r lr xlr extra <<< "$spec"
  .venv/bin/python benchmarks/finetune_gpt2.py finetune --base runs/ft_base_s2 --data "$EMAIL" --adapter fhme \
    --lr $lr --expert-lr $xlr --seed 1 --eval-bytes 262144 $extra | tail -1
done >> $G/pilots.jsonl
# How well the gates tell the domains apart, by the size of their routing (the gates alone,
# before any training): the share of each domain's positions they hold below 1/2
for domain in "$EMAIL" runs/ft_rows_fixed/data/kjv.txt; do
  .venv/bin/python benchmarks/gate_separation.py --base runs/ft_base_s2 --data "$domain" --routing \
    '[{"num_experts": 65536}, {"num_experts": 1048576}, {"num_experts": 4194304}, {"heads": 4, "topk": 16}]'
done > $G/gate_separation.jsonl
# The study: gated FHME adapters at four rates, both replicates and domains; LoRA at 1e-2 (and
# 3e-2 on email, where 1e-2 is its best) to find its best rate
for spec in s3:email:gated-fhme:1e-3:0.0167 s3:email:gated-fhme:3e-3:0.05 s3:email:gated-fhme:1e-2:0.15 \
    s2:email:gated-fhme:1e-3:0.0167 s2:email:gated-fhme:3e-3:0.05 s2:email:gated-fhme:1e-2:0.15 \
    s3:kjv:gated-fhme:1e-3:0.0167 s3:kjv:gated-fhme:3e-3:0.05 s3:kjv:gated-fhme:1e-2:0.15 \
    s2:kjv:gated-fhme:1e-3:0.0167 s2:kjv:gated-fhme:3e-3:0.05 s2:kjv:gated-fhme:1e-2:0.15 \
    s2:email:lora:1e-2:0.05 s2:kjv:lora:1e-2:0.05 s3:email:lora:1e-2:0.05 s3:kjv:lora:1e-2:0.05 \
    s2:email:lora:3e-2:0.05 s3:email:lora:3e-2:0.05 s3:email:gated-fhme:3e-4:0.005 s2:email:gated-fhme:3e-4:0.005 \
    s3:kjv:gated-fhme:3e-4:0.005 s2:kjv:gated-fhme:3e-4:0.005; do
  IFS=: read -r s domain method lr xlr <<< "$spec"
  adapt_run runs/ft_base_$s ${s#s} $domain $method $lr $xlr
done >> $G/finetune.jsonl
# Stage after stage behind gates: email, then the Bible from that run, by the command line, beside
# LoRA and full fine-tuning on the same base (the Bible's text copied from runs/ft_rows_fixed)
mkdir -p runs/ft_gated_seq/data && cp runs/ft_rows_fixed/data/kjv.txt runs/ft_gated_seq/data/
METHODS="fhme-domain-gate fhme-lora16-gate lora full" SEEDS="2 3" STUDIES="single sequential" DOMAINS=email \
  LR_POINTS=3 EVAL_BYTES=262144 RESULTS=$R/finetune_gated_seq bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_gated_seq
.venv/bin/python benchmarks/finetune_table.py $R/finetune_gated_seq/finetune.jsonl |
  sed -n '/^#### Sequential/,$p' > $R/finetune_gated_seq/finetune_tables.md
# (its first stage at seed 2 is the command line's gated FHME adapters on the base, rate and seed of
# one run of the gate-prior study below: gates fitted after training, prior 0)
.venv/bin/python benchmarks/finetune_table.py $G/finetune.jsonl --levels email:4.4 email:4.0 email:3.6 email:3.4 \
  email:3.25 email:3.15 kjv:2.5 kjv:2.4 kjv:2.3 kjv:2.25 kjv:2.15 > $G/finetune_tables.md
# The gates' prior: FHME adapters trained without gates at three rates (both replicates and
# domains), then gated on the trained model (--gate-after) and read with the gates at five priors
# (pilots, seed 1: gates fitted after training beat gates trained behind at prior 0 and at 4)
P=$R/finetune_gate_prior
mkdir -p $P
for domain in "$EMAIL" runs/ft_rows_fixed/data/kjv.txt; do  # how fast each domain's text moves the gates
  .venv/bin/python benchmarks/gate_separation.py --base runs/ft_base_s2 --data "$domain" --by-position
done > $P/gate_positions.jsonl
for spec in "$EMAIL 3e-3 0.05 --gate-after --priors=0,2,4,6" "$EMAIL 1e-3 0.0167 --gate-after --priors=0,2,4,6,8,12" \
    "runs/ft_rows_fixed/data/kjv.txt 3e-3 0.05 --gate-after --priors=0,2,4,6,8,12" \
    "$EMAIL 3e-3 0.05 --domain-gate --priors=0,2,4,6,8,12" "$EMAIL 3e-3 0.05 --domain-gate --gate-prior 4 --priors=0,2,4,6,8,12"; do
  read -r data lr xlr extra <<< "$spec"
  .venv/bin/python benchmarks/finetune_gpt2.py finetune --base runs/ft_base_s2 --data "$data" --adapter fhme \
    --lr $lr --expert-lr $xlr --seed 1 --eval-bytes 262144 $extra | tail -1
done > $P/pilots.jsonl
for s in 2 3; do for domain in email kjv; do for spec in 3e-4:0.005 1e-3:0.0167 3e-3:0.05; do
  adapt_run runs/ft_base_s$s $s $domain fhme ${spec%%:*} ${spec##*:} --gate-after --priors=-2,0,2,4,8
done; done; done >> $P/finetune.jsonl
.venv/bin/python benchmarks/finetune_table.py $P/finetune.jsonl $G/finetune.jsonl --methods fhme gated-fhme lora full \
  --levels email:4.4 email:4.0 email:3.6 email:3.4 email:3.25 email:3.15 email:3.0 email:2.9 email:2.8 \
  kjv:2.5 kjv:2.4 kjv:2.3 kjv:2.25 kjv:2.2 kjv:2.15 kjv:2.12 > $P/finetune_tables.md
# The posterior mixture (fractalmoe.mixture.PosteriorMixture): each trained model beside a fresh
# copy of its base taken before training, weighted by how well each has predicted the window so far
# (--mix: bpb_mixed).
# Pilots (fine-tuning seed 1, the rebuilt seed-2 base, email at 3e-3 unless marked; pilots.jsonl,
# the shape variants without a flag read by an equivalent script): FHME adapter shapes at LoRA's
# count: block convolutions, key width 16, SiLU-gated value blocks, 1 head x top-16 (also at 1e-3
# and 1e-2, at 3e-3 / 0.15 and 1e-2 / 0.05, with gated value blocks, and on the Bible beside the default
# shape); LoRA at 1e-2
M=$R/finetune_mixture
mkdir -p $M
for spec in "$EMAIL 3e-3 0.05 --heads 1 --topk 16" "$EMAIL 1e-3 0.0167 --heads 1 --topk 16" \
    "$EMAIL 1e-2 0.15 --heads 1 --topk 16" "$EMAIL 3e-3 0.15 --heads 1 --topk 16" "$EMAIL 1e-2 0.05 --heads 1 --topk 16" \
    "runs/ft_rows_fixed/data/kjv.txt 3e-3 0.05" \
    "runs/ft_rows_fixed/data/kjv.txt 3e-3 0.05 --heads 1 --topk 16"; do
  read -r data lr xlr extra <<< "$spec"
  .venv/bin/python benchmarks/finetune_gpt2.py finetune --base runs/ft_base_s2 --data "$data" --adapter fhme \
    --lr $lr --expert-lr $xlr --seed 1 --eval-bytes 262144 $extra | tail -1
done > $M/pilots.jsonl
.venv/bin/python benchmarks/finetune_gpt2.py finetune --base runs/ft_base_s2 --data "$EMAIL" --adapter lora \
  --lr 1e-2 --expert-lr 0.05 --seed 1 --eval-bytes 262144 --mix | tail -1 >> $M/pilots.jsonl
# The study: FHME adapters of 1 head x top-16 (the pilots' best shape), LoRA and full fine-tuning,
# each at the two rates around its best, both replicates and domains, each read alone and mixed
for s in 2 3; do for spec in email:fhme:1e-3:0.0167 email:fhme:3e-3:0.05 email:lora:3e-3:0.05 email:lora:1e-2:0.05 \
    email:full:3e-5:0.0015 email:full:1e-4:0.005 kjv:fhme:1e-3:0.0167 kjv:fhme:3e-3:0.05 kjv:lora:1e-3:0.05 \
    kjv:lora:3e-3:0.05 kjv:full:1e-5:0.0005 kjv:full:3e-5:0.0015; do
  IFS=: read -r domain method lr xlr <<< "$spec"
  shape=""; [ $method = fhme ] && shape="--heads 1 --topk 16"
  adapt_run runs/ft_base_s$s $s $domain $method $lr $xlr --mix $shape
done; done > $M/finetune.jsonl
# ... and stage after stage: the command line's runs above (email, then the Bible), each alone and
# as the mixture of its lineage (base, email stage, Bible stage: log2(3) / 128 bpb from the best)
.venv/bin/python benchmarks/mixture_lineage.py runs/ft_gated_seq/email_*_s[23] runs/ft_gated_seq/seq_kjv_after_email_*_s[23] \
  --eval-bytes 262144 > $M/lineage.jsonl
.venv/bin/python benchmarks/finetune_table.py $M/finetune.jsonl --levels email:4.0 email:3.6 email:3.2 email:3.0 \
  email:2.9 email:2.8 kjv:2.4 kjv:2.3 kjv:2.2 kjv:2.15 kjv:2.12 > $M/finetune_tables.md
# Re-routing the base's memory beside FHME adapters (--reroute). The pilots (seed 1, email) are in
# $R/finetune_reroute/pilots.jsonl, each line with its finetune_gpt2.py flags ("args"); lines with
# "overrides" changed the adapters' config or what trains beyond what a flag offers. The study: FHME
# adapters of 1 x top-15 with the base's routers' queries learning, both bases, seeds and domains,
# three rates around the pilots' best, each read alone and mixed; LoRA, full fine-tuning and the
# adapters of 1 x 16 are the mixture study's runs above.
X=$R/finetune_reroute
for spec in email:3e-3:0.05 email:1e-3:0.0167 kjv:3e-3:0.05 kjv:1e-3:0.0167 email:1e-2:0.05 kjv:3e-4:0.005; do for s in 2 3; do
  IFS=: read -r domain lr xlr <<< "$spec"
  adapt_run runs/ft_base_s$s $s $domain fhme-reroute $lr $xlr --mix
done; done > $X/finetune.jsonl
.venv/bin/python benchmarks/finetune_table.py $X/finetune.jsonl $M/finetune.jsonl --levels email:4.0 email:3.6 \
  email:3.2 email:3.0 email:2.9 email:2.8 kjv:2.4 kjv:2.3 kjv:2.2 kjv:2.15 kjv:2.12 > $X/finetune_tables.md
# Two more bases (seeds 4 and 5): re-routed adapters and LoRA, each at its best rate of the study above
for s in 4 5; do
  $F train --seed $s --max-steps 1200 --out runs/ft_base_s$s --quiet
  for spec in email:fhme-reroute:3e-3:0.05 email:lora:1e-2:0.05 kjv:fhme-reroute:1e-3:0.0167 kjv:lora:3e-3:0.05; do
    IFS=: read -r domain method lr xlr <<< "$spec"
    adapt_run runs/ft_base_s$s $s $domain $method $lr $xlr --mix
  done
done > $X/more_bases.jsonl
# ... and stage after stage by the command line (email at 3e-3, then the Bible from it), each alone
# and as the mixture of its lineage
mkdir -p runs/ft_reroute_seq/data && cp runs/ft_rows_fixed/data/kjv.txt runs/ft_reroute_seq/data/
METHODS=fhme-reroute SEEDS="2 3" STUDIES="single sequential" DOMAINS=email LR_POINTS=3 EVAL_BYTES=262144 \
  RESULTS=$R/finetune_reroute_seq bash benchmarks/finetune.sh runs/ft_base_s2 runs/ft_reroute_seq
.venv/bin/python benchmarks/mixture_lineage.py runs/ft_reroute_seq/email_*_s[23] \
  runs/ft_reroute_seq/seq_kjv_after_email_*_s[23] --eval-bytes 262144 > $R/finetune_reroute_seq/lineage.jsonl
# On a GPT-2 base (rebuilt), mixed: FHME adapters of 1 x 16 and LoRA at two rates each, seed-1
# pilots first, then seeds 2 and 3, each read alone and mixed with the base
X=$R/finetune_gpt2_mixture
.venv/bin/python benchmarks/finetune_gpt2.py base --out runs/gpt2_base > $X/finetune_gpt2_base.json
for spec in "fhme-1x16 1e-3 0.0167" "fhme-1x16 3e-3 0.05" "lora 1e-2 0.05"; do
  read -r method lr xlr <<< "$spec"
  shape=""; [ "$method" = fhme-1x16 ] && shape="--heads 1 --topk 16"
  adapt_run runs/gpt2_base 1 email $method $lr $xlr --mix $shape
done > $X/pilots.jsonl
for s in 2 3; do for spec in "fhme-1x16 1e-3 0.0167" "fhme-1x16 3e-3 0.05" "lora 3e-3 0.05" "lora 1e-2 0.05"; do
  read -r method lr xlr <<< "$spec"
  shape=""; [ "$method" = fhme-1x16 ] && shape="--heads 1 --topk 16"
  adapt_run runs/gpt2_base $s email $method $lr $xlr --mix $shape
done; done > $X/finetune.jsonl
.venv/bin/python benchmarks/finetune_table.py $X/finetune.jsonl --levels 3.6 3.4 3.2 3.15 > $X/finetune_tables.md
# FHME adapters at the attention input too (--attention-experts): pilots (seed 1) in
# $R/finetune_attention/pilots.jsonl, each with its finetune_gpt2.py flags ("args"; lines with
# "overrides" placed or sized the adapters beyond what a flag offers); then on the GPT-2 base,
# 1 x top-16 beside each MLP and 64 experts at each attention input, seeds 2 and 3, three rates,
# each read alone and mixed; LoRA's rows are the mixed GPT-2 study's above; full fine-tuning on
# the same base at four rates, also mixed
A=$R/finetune_attention
for s in 2 3; do for spec in "1e-3 0.0167" "3e-3 0.05" "5e-3 0.05"; do
  read -r lr xlr <<< "$spec"
  adapt_run runs/gpt2_base $s email fhme-1x16-att64 $lr $xlr --mix --heads 1 --topk 16 --attention-experts 64
done; done > $A/finetune.jsonl
for s in 2 3; do for spec in "1e-4 0.005" "3e-4 0.015" "1e-3 0.05" "3e-3 0.15"; do
  read -r lr xlr <<< "$spec"
  adapt_run runs/gpt2_base $s email full $lr $xlr --mix
done; done > $A/full.jsonl
.venv/bin/python benchmarks/finetune_table.py $A/finetune.jsonl $A/full.jsonl $X/finetune.jsonl \
  --levels 3.6 3.4 3.2 3.1 3.05 3.0 > $A/finetune_tables.md
# ... and the same base adapted to the Bible: attention-side FHME adapters at three rates, LoRA at
# three, the adapters of 1 x 16 at their best email rate, full fine-tuning at three, each read
# alone and mixed
for s in 2 3; do
  for spec in "3e-4 0.005" "1e-3 0.0167" "3e-3 0.05"; do read -r lr xlr <<< "$spec"
    adapt_run runs/gpt2_base $s kjv fhme-1x16-att64 $lr $xlr --mix --heads 1 --topk 16 --attention-experts 64; done
  for lr in 3e-3 1e-2 2e-2; do adapt_run runs/gpt2_base $s kjv lora $lr 0.05 --mix; done
  adapt_run runs/gpt2_base $s kjv fhme-1x16 1e-3 0.0167 --mix --heads 1 --topk 16
done > $A/kjv.jsonl
for s in 2 3; do for spec in "3e-4 0.015" "1e-3 0.05" "3e-3 0.15"; do read -r lr xlr <<< "$spec"
  adapt_run runs/gpt2_base $s kjv full $lr $xlr --mix
done; done > $A/kjv_full.jsonl
.venv/bin/python benchmarks/finetune_table.py $A/kjv.jsonl $A/kjv_full.jsonl --levels 2.6 2.5 2.45 2.42 \
  > $A/kjv_tables.md
# LoRA on the attention projections beside FHME adapters (--attention-lora): pilots (seed 1, then
# seed 4) in $A/attention_lora_pilots.jsonl. The study: on the GPT-2 base rank 32 with the
# attention-side FHME adapters (64 experts) and 1 x top-16 beside each MLP; on the FractalMoE bases
# rank 16 with --reroute and 1 x top-12; both domains, seeds 2 and 3, the rates of the studies they
# extend, each read alone and mixed
for s in 2 3; do for spec in email:1e-3:0.0167 email:3e-3:0.05 email:5e-3:0.05 kjv:3e-4:0.005 kjv:1e-3:0.0167 kjv:3e-3:0.05; do
  IFS=: read -r domain lr xlr <<< "$spec"
  adapt_run runs/gpt2_base $s $domain fhme-1x16-att64-lora32 $lr $xlr --mix --heads 1 --topk 16 --attention-experts 64 \
    --attention-lora 32
done; done > $A/attention_lora.jsonl
.venv/bin/python benchmarks/finetune_table.py $A/attention_lora.jsonl $A/finetune.jsonl $A/full.jsonl $X/finetune.jsonl \
  $A/kjv.jsonl $A/kjv_full.jsonl --levels email:3.6 email:3.4 email:3.2 email:3.1 email:3.0 email:2.95 kjv:2.6 kjv:2.5 \
  kjv:2.45 kjv:2.42 kjv:2.41 > $A/attention_lora_tables.md
for s in 2 3; do for spec in email:1e-3:0.0167 email:3e-3:0.05 email:1e-2:0.05 kjv:3e-4:0.005 kjv:1e-3:0.0167 kjv:3e-3:0.05; do
  IFS=: read -r domain lr xlr <<< "$spec"
  adapt_run runs/ft_base_s$s $s $domain fhme-reroute-lora16 $lr $xlr --mix --reroute --heads 1 --topk 12 --attention-lora 16
done; done > $A/reroute_lora.jsonl
.venv/bin/python benchmarks/finetune_table.py $A/reroute_lora.jsonl $R/finetune_reroute/finetune.jsonl $M/finetune.jsonl \
  --levels email:4.0 email:3.6 email:3.2 email:3.0 email:2.9 email:2.8 email:2.72 email:2.7 kjv:2.4 kjv:2.3 kjv:2.2 \
  kjv:2.15 kjv:2.12 kjv:2.09 > $A/reroute_lora_tables.md
# ... and on the two more bases (seeds 4 and 5) at the study's best rates, beside the re-routed
# adapters and LoRA there ($R/finetune_reroute/more_bases.jsonl)
for s in 4 5; do for spec in email:1e-2:0.05 kjv:1e-3:0.0167; do
  IFS=: read -r domain lr xlr <<< "$spec"
  adapt_run runs/ft_base_s$s $s $domain fhme-reroute-lora16 $lr $xlr --mix --reroute --heads 1 --topk 12 --attention-lora 16
done; done > $A/reroute_lora_more_bases.jsonl
# Every update behind a domain gate (--gate-after): FHME adapters of 1 x top-12 beside each FFN and
# LoRA of rank 16 on attention (no --reroute: the base routers' query weights cannot sit behind a
# gate), trained as they are, then each FFN adapter and each LoRA'd projection behind a gate fitted
# on the trained model, read at priors 0, 4 and 12; the FractalMoE bases, both domains, seeds 2 and
# 3, the rates of the study above; LoRA and full fine-tuning from the gated-rows study (same bases).
# Then the GPT-2 base's shape (64 experts at the attention input, LoRA of rank 32) on email, and
# LoRA itself behind gates (seed 2, its two best rates). A seed-1 pilot of each is in pilots.jsonl.
G=$R/finetune_gated_all
for s in 2 3; do for spec in email:1e-3:0.0167 email:3e-3:0.05 email:1e-2:0.05 kjv:3e-4:0.005 kjv:1e-3:0.0167 kjv:3e-3:0.05; do
  IFS=: read -r domain lr xlr <<< "$spec"
  adapt_run runs/ft_base_s$s $s $domain fhme-lora16-gated $lr $xlr --heads 1 --topk 12 --attention-lora 16 \
    --gate-after --priors 0,4,12
done; done > $G/finetune.jsonl
.venv/bin/python benchmarks/finetune_table.py $G/finetune.jsonl $R/finetune_gated_rows/finetune.jsonl \
  --methods fhme-lora16-gated lora full --levels email:4.0 email:3.6 email:3.2 email:3.0 email:2.9 email:2.8 \
  email:2.73 kjv:2.5 kjv:2.4 kjv:2.3 kjv:2.23 kjv:2.15 kjv:2.1 > $G/finetune_tables.md
for s in 2 3; do for spec in "1e-3 0.0167" "3e-3 0.05" "5e-3 0.05"; do read -r lr xlr <<< "$spec"
  adapt_run runs/gpt2_base $s email fhme-1x16-att64-lora32-gated $lr $xlr --heads 1 --topk 16 --attention-experts 64 \
    --attention-lora 32 --gate-after --priors 0,4,12
done; done > $G/gpt2.jsonl
for lr in 3e-3 1e-2; do adapt_run runs/gpt2_base 2 email lora-gated $lr 0.05 --gate-after --priors 0,4,12; done \
  >> $G/gpt2.jsonl
.venv/bin/python benchmarks/finetune_table.py $G/gpt2.jsonl $R/finetune_gpt2_mixture/finetune.jsonl \
  $A/full.jsonl --methods fhme-1x16-att64-lora32-gated lora-gated lora full \
  --levels 3.6 3.4 3.2 3.1 3.0 2.99 > $G/gpt2_tables.md
# A change to the tied byte embeddings beside that shape's adapters, every update behind a gate of
# its own (LoRA on attention at rank 28, to stay within LoRA's count), on a GPT-2 base rebuilt by
# today's code (2.5998 bpb where the one above read 2.5950), with LoRA and full fine-tuning rerun on
# it at the rates above; the seed-1 pilot and the gate-reading pilots are in pilots.jsonl and
# gate_evidence.jsonl
E=$R/finetune_gated_embeddings
.venv/bin/python benchmarks/finetune_gpt2.py base --out runs/gpt2_base_r > $E/base.json
.venv/bin/python benchmarks/gate_evidence.py --base runs/gpt2_base_r --data $EMAIL > $E/gate_evidence.jsonl
for s in 2 3; do
  for spec in "1e-3 0.0167" "3e-3 0.05" "5e-3 0.05"; do read -r lr xlr <<< "$spec"
    adapt_run runs/gpt2_base_r $s email fhme-1x16-att64-lora28-emb-gated $lr $xlr --heads 1 --topk 16 \
      --attention-experts 64 --attention-lora 28 --with-embeddings --gate-after --priors 0,4,12; done
  for lr in 3e-3 1e-2; do adapt_run runs/gpt2_base_r $s email lora $lr 0.05; done
  for spec in "1e-4 0.005" "3e-4 0.015" "1e-3 0.05" "3e-3 0.15" "1e-2 0.5"; do read -r lr xlr <<< "$spec"
    adapt_run runs/gpt2_base_r $s email full $lr $xlr; done
done > $E/gpt2.jsonl
.venv/bin/python benchmarks/finetune_table.py $E/gpt2.jsonl --levels 3.6 3.4 3.2 3.1 3.0 2.99 2.9 2.8 2.75 2.7 \
  > $E/gpt2_tables.md
# ... and a pilot on a FractalMoE base (seed 2, rebuilt by today's code), email, with and without
# it, beside LoRA at its best email rate and full fine-tuning at two rates on the same base
{ adapt_run runs/ft_base_s2 1 email fhme-lora16-emb-gated 3e-3 0.05 --heads 1 --topk 12 --attention-lora 16 \
    --with-embeddings --gate-after --priors 0,4,12
  adapt_run runs/ft_base_s2 1 email fhme-lora16-gated 3e-3 0.05 --heads 1 --topk 12 --attention-lora 16 \
    --gate-after --priors 0,4,12
  adapt_run runs/ft_base_s2 1 email lora 1e-2 0.05
  adapt_run runs/ft_base_s2 1 email full 3e-4 0.015
  adapt_run runs/ft_base_s2 1 email full 1e-3 0.05; } > $E/fractalmoe_pilots.jsonl
# ... then the study on both FractalMoE bases (seeds 2 and 3, each rebuilt by today's code), email
# and the Bible: the adapters with the change at three rates, LoRA and full fine-tuning at three each
# on the same bases
embedding_study() {  # BASE SEED DOMAIN "ADAPTER RATES" "LORA RATES" "FULL RATES" (rates as lr:table-lr)
  for spec in $4; do adapt_run $1 $2 $3 fhme-lora16-emb-gated ${spec%%:*} ${spec##*:} --heads 1 --topk 12 \
    --attention-lora 16 --with-embeddings --gate-after --priors 0,4,12; done
  for lr in $5; do adapt_run $1 $2 $3 lora $lr 0.05; done
  for spec in $6; do adapt_run $1 $2 $3 full ${spec%%:*} ${spec##*:}; done
}
for s in 2 3; do
  embedding_study runs/ft_base_s$s $s email "3e-3:0.05 1e-3:0.0167 1e-2:0.05" "3e-3 1e-2 2e-2" \
    "1e-4:0.005 3e-4:0.015 1e-3:0.05 3e-3:0.15 1e-2:0.5"
  embedding_study runs/ft_base_s$s $s kjv "1e-3:0.0167 3e-4:0.005 3e-3:0.05 1e-2:0.05" "1e-3 3e-3 1e-2 3e-2" \
    "1e-5:0.0005 3e-5:0.0015 1e-4:0.005 3e-4:0.015 1e-3:0.05 3e-3:0.15"
done > $E/fractalmoe.jsonl
.venv/bin/python benchmarks/finetune_table.py $E/fractalmoe.jsonl --levels email:3.6 email:3.2 email:3.0 email:2.8 \
  email:2.7 email:2.6 email:2.5 email:2.4 kjv:2.5 kjv:2.4 kjv:2.3 kjv:2.2 kjv:2.15 kjv:2.1 kjv:2.05 > $E/fractalmoe_tables.md
# Where the embeddings run's gain and loss come from: its tables, the input side, the output head
.venv/bin/python benchmarks/embedding_sides.py runs/ft_rows_embed/email_memory-step-embed_lr3e-4_s2 \
  > $R/finetune_rows_pilots/embedding_sides.jsonl
# The same on a base with 4x the rows a table (65,536 experts, else the same command): do rows the
# base seldom reads make memory fine-tuning forget less?
$F train --seed 2 --max-steps 1200 --set num_experts=65536 --out runs/ft_base_65k_s2 --quiet
for spec in "memory-step:2 3 4 5" "lora:1 2 3" "full:1 2"; do
  METHODS="${spec%%:*}" LR_POINTS="${spec##*:}" SEEDS=2 DOMAINS=email STUDIES=single EVAL_BYTES=262144 \
    RESULTS=$R/finetune_rows_65k bash benchmarks/finetune.sh runs/ft_base_65k_s2 runs/ft_rows_65k
done
# Where the unused experts of those two bases come from: their sub-keys, or how they are paired
.venv/bin/python benchmarks/pair_usage.py runs/ft_base_65k_s2 runs/ft_base_s2 > $R/pair_usage.jsonl
.venv/bin/python benchmarks/finetune_table.py $R/finetune_rows_65k/finetune.jsonl --levels 3.8 3.5 3.2 \
  > $R/finetune_rows_65k/finetune_tables.md
.venv/bin/python benchmarks/row_exposure.py runs/ft_rows_fixed/email_memory-step_lr*_s2 \
  runs/ft_rows_65k/email_memory-step_lr*_s2 > $R/finetune_rows_65k/row_exposure.jsonl
# Where FHME's reads go: the first default, the untie pilots (64 windows), then with the query
# convolution and with block convolutions (pilots and the reported runs), order of reads included,
# heads per column (1,4) and the 1-layer models
.venv/bin/python benchmarks/fractal_paths.py runs/quality/final/shakespeare_fhme_s2/runs/fhme-seed2 --windows 128 > $R/fractal_paths.jsonl
for run in untie-pilots/fhme_tied untie-pilots/fhme_untied table-lr-pilots/fhme_gated_conv4_elr0.03 \
           shape-pilots/stdlib_fhme_gated_conv4_h2k24 block-conv-pilots/shakespeare_fhme_gated_conv4_bconv4 \
           block-conv-pilots/stdlib_fhme_gated_conv4_bconv4 block-conv/shakespeare_fhme_gated_conv4_bconv4_s2 \
           block-conv/stdlib_fhme_gated_conv4_bconv4_s2 block-conv/shakespeare_fhme_gated_conv4_bconv4_s3 \
           block-conv/stdlib_fhme_gated_conv4_bconv4_s3 column-heads/shakespeare_fhme_gated_conv4_bconv4_h14_s2 \
           column-heads/stdlib_fhme_gated_conv4_bconv4_h14_s2 column-heads/shakespeare_fhme_gated_conv4_bconv4_h14_s3 \
           column-heads/stdlib_fhme_gated_conv4_bconv4_h14_s3 shallow/shakespeare_fhme_L1_s2 \
           shallow-heads/shakespeare_fhme_L1_s2_h14 shallow/stdlib_fhme_L1_s2 shallow-heads/stdlib_fhme_L1_s2_h14; do
  .venv/bin/python benchmarks/fractal_paths.py runs/quality/$run/runs/fhme-seed* >> $R/fractal_paths.jsonl
done
# Fine-tuning and forgetting (email, the King James Bible, sequential), seed 2
METHODS="fhme lora full" SEEDS=2 EVAL_BYTES=262144 STUDIES="single sequential" bash benchmarks/finetune.sh runs/default
METHODS="fhme-rows" SEEDS=2 EVAL_BYTES=262144 DOMAINS=email STUDIES=single bash benchmarks/finetune.sh runs/default
# Earlier adaptive study (before compacted training)
$F train --config configs/adaptive.toml $PONDER --out runs/adaptive --quiet > $R/adaptive_train.log 2>&1
$F train --config configs/adaptive.toml --set adaptive_depth=false --set depth_explore=0 --set depth_target=0 --out runs/adaptive_full --quiet > $R/adaptive_full_train.log 2>&1
$F bench adaptive --ckpt runs/adaptive --json > $R/adaptive.jsonl
$F bench adaptive --ckpt runs/adaptive_full --json > $R/adaptive_full.jsonl
$F plot runs/adaptive --out $R/adaptive_plots --depth-map --text "$(head -c 256 src/fractalmoe/tinyshakespeare.txt)"

# Comparisons at equal active FLOPs (2 seeds), expert usage at 65,536 experts, scaling study
$F compare --models fhme,dense,moe,pkm,peer --max-steps 300 --seeds 1,2 --out runs/compare --json > $R/compare.jsonl
cp runs/compare/table.md runs/compare/*.png runs/compare/results.jsonl $R/ && mv $R/results.jsonl $R/compare_results.jsonl
$F compare --models fhme,peer --set num_experts=65536 --set query_norm=running --max-steps 200 --out runs/usage65k --json > $R/usage65k.jsonl
cp runs/usage65k/results.jsonl $R/usage65k_results.jsonl
# Routing balance at 65,536 experts (FLOP-matched PEER and FHME, 200 steps): one run per setting
for args in "peer" "fhme" "peer --set query_norm=whiten" "peer --set query_norm=whiten --set unit_keys=true" \
            "peer --set balance_rate=0.003" "peer --set balance_rate=0.01" "peer --set balance_loss=0.01" \
            "peer --set balance_loss=0.03" "peer --set balance_loss=0.1" "fhme --set balance_loss=0.03"; do
  name=$(echo "$args" | tr -c 'a-z0-9.' '_')
  $F compare --models $args --set num_experts=65536 --max-steps 200 --out runs/balance65k/$name --json
done
cat runs/balance65k/*/results.jsonl > $R/balance65k_results.jsonl
$F compare --models fhme,peer --set num_experts=65536 --set balance_loss=0.01 --max-steps 200 --out runs/usage65k_balanced --json > $R/usage65k_balanced.jsonl
cp runs/usage65k_balanced/results.jsonl $R/usage65k_balanced_results.jsonl
# The comparison rerun (reproducibility) and routed models with the balance loss at the default size
$F compare --models fhme,dense,moe,pkm,peer --max-steps 300 --seeds 1,2 --out runs/compare_rerun --json > $R/compare_rerun.jsonl
cp runs/compare_rerun/results.jsonl $R/compare_rerun_results.jsonl
$F compare --models fhme,peer --set balance_loss=0.01 --max-steps 300 --seeds 1,2 --out runs/compare_balanced --json > $R/compare_balanced.jsonl
cp runs/compare_balanced/table.md $R/compare_balanced_table.md
# Scaling study: experts (PEER, default shape) and fractal depth (FHME)
$F compare --models peer --sweep num_experts=1024,4096,16384,65536,262144 --max-steps 150 --out runs/scaling_experts --json > $R/scaling_experts.jsonl
$F compare --models peer --set balance_loss=0.01 --sweep num_experts=1024,4096,16384,65536,262144 --max-steps 150 --out runs/scaling_experts_balanced --json > $R/scaling_experts_balanced.jsonl
$F compare --models fhme --sweep fractal_depth=1,2,3,4 --max-steps 300 --out runs/scaling_depth --json > $R/scaling_depth.jsonl
cp runs/scaling_depth/results.jsonl $R/scaling_depth_results.jsonl

# Scale-out: 1 vs 2 processes at 262,144 experts
bash benchmarks/distributed.sh

# Fine-tuning: forgetting study (email source, KJV prose, GPT-2 base)
bash benchmarks/finetune.sh runs/default runs/finetune_study
# Earlier fine-tuning table: the default run adapted to Python's email package source
$F eval --ckpt runs/default --data $STD --json > $R/finetune_base_eval.json
for k in fhme lora full; do
  $F finetune --base runs/default --data $STD --adapter $k --out runs/ft_$k --max-steps 150 --quiet > $R/finetune_$k.log 2>&1
done
.venv/bin/python benchmarks/make_tables.py

# bfloat16 autocast against float32: the default recipe at 1,200 steps, seeds 2 and 3 -> results/autocast
SEED=2 bash benchmarks/autocast_quality.sh runs/autocast
SEED=3 bash benchmarks/autocast_quality.sh runs/autocast

# On a GPU (not this machine): every CUDA path, host syncs under the sync debug mode, the layer and
# model benchmarks with --device cuda, a profile of the layer's GPU step -> benchmarks/results/gpu_check/
# (committed: gpu_check/ from one H200, gpu_check_h100/ from one H100, PyTorch 2.11)
# PYTHON=python3 GPU_CHECK_BUDGET=460 bash benchmarks/gpu_check.sh
# python3 -m fractalmoe bench layer --device cuda --experts 1048576 --steps 5 --repeats 3 --force --json \
#     --impl fractalmoe,fractalmoe-lazy-adam,fractalmoe-lazy-adam-fused,peer-pytorch-sparse,peer-pytorch
# python3 -m fractalmoe bench layer --device cuda --experts 16384 --steps 5 --repeats 3 --force --json \
#     --impl fractalmoe,fractalmoe-lazy-adam-fused
