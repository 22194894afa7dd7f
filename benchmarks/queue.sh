#!/usr/bin/env bash
# The long-running measurements behind the README, in priority order (see run_all.sh for all).
set -u
F=.venv/bin/fractalmoe
R=benchmarks/results
mkdir -p $R runs
while pgrep -f "fractalmoe compare --models fhme,dense" > /dev/null; do sleep 5; done
cp runs/compare/table.md runs/compare/*.png $R/ 2>/dev/null
STD=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/email
/usr/bin/time -v $F train --config configs/million.toml --out runs/million --quiet > $R/million_train.log 2>&1
$F eval --ckpt runs/default --data $STD --json > $R/finetune_base_eval.json 2>> $R/errors.log
for k in fhme lora full; do
  $F finetune --base runs/default --data $STD --adapter $k --out runs/ft_$k --max-steps 150 --quiet > $R/finetune_$k.log 2>&1
done
$F compare --models fhme,peer --set num_experts=65536 --set query_norm=running --max-steps 200 --out runs/usage65k --json > $R/usage65k.jsonl 2>> $R/errors.log
$F plot runs/adaptive --out $R/adaptive_plots --depth-map --text "$(head -c 256 src/fractalmoe/tinyshakespeare.txt)" >> $R/errors.log 2>&1
echo done > $R/queue.done
