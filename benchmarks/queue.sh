#!/usr/bin/env bash
# The long-running measurements behind the README, in priority order (~1 h on 2 CPU cores).
set -u
F=.venv/bin/fractalmoe
R=benchmarks/results
mkdir -p $R runs
while pgrep -f "out runs/adaptive_full" > /dev/null; do sleep 5; done
STD=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/email
rm -rf runs/adaptive
$F train --config configs/adaptive.toml --out runs/adaptive --quiet > $R/adaptive_train.log 2>&1
$F bench adaptive --ckpt runs/adaptive --json > $R/adaptive.jsonl 2>> $R/errors.log
$F bench adaptive --ckpt runs/adaptive_full --json > $R/adaptive_full.jsonl 2>> $R/errors.log
$F compare --models fhme,dense,moe,pkm,peer --max-steps 300 --seeds 1,2 --out runs/compare --json > $R/compare.jsonl 2>> $R/errors.log
$F compare --models fhme,peer --set num_experts=65536 --set query_norm=running --max-steps 300 --out runs/usage65k --json > $R/usage65k.jsonl 2>> $R/errors.log
$F eval --ckpt runs/default --data $STD --json > $R/finetune_base_eval.json 2>> $R/errors.log
for k in fhme lora full; do
  $F finetune --base runs/default --data $STD --adapter $k --out runs/ft_$k --max-steps 300 --quiet > $R/finetune_$k.log 2>&1
done
$F compare --models peer --sweep num_experts=1024,4096,16384,65536,262144 --max-steps 150 --out runs/scaling_experts --json > $R/scaling_experts.jsonl 2>> $R/errors.log
$F compare --models fhme --sweep fractal_depth=1,2,3,4 --max-steps 150 --out runs/scaling_depth --json > $R/scaling_depth.jsonl 2>> $R/errors.log
/usr/bin/time -v $F train --config configs/million.toml --out runs/million --quiet > $R/million_train.log 2>&1
$F plot runs/adaptive --out $R/adaptive_plots --depth-map --text "$(head -c 256 src/fractalmoe/tinyshakespeare.txt)" >> $R/errors.log 2>&1
echo done > $R/queue.done
