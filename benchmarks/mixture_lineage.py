"""Fine-tuning runs read alone and as the posterior mixture of their lineage (the run, its base and
every earlier stage, even odds; ``fractalmoe.mixture``), on every domain of the lineage.

    python benchmarks/mixture_lineage.py RUN [RUN ...] [--eval-bytes 262144]

One JSON line a run: the domains (the run's own, then the base's, then each earlier stage's, as
``fractalmoe finetune`` reports them), ``bpb`` of the run alone and ``bpb_mixed`` of the mixture
on each, read over the same validation prefixes (``--eval-bytes``) as the runs' own reports.
"""

from __future__ import annotations

import argparse
import json

from fractalmoe.checkpoint import load_run_config, run_extra
from fractalmoe.evaluate import val_bpb
from fractalmoe.finetune import kept_domains, lineage, load_domain
from fractalmoe.mixture import runs_mixture


def read_run(run: str, eval_bytes: int | None) -> dict:
    chain = lineage(run)
    config, extra = load_run_config(chain[-1]), run_extra(chain[-1])
    seq_len, batch = config.model.seq_len, config.train.batch_size
    kept = kept_domains(chain[:-1], eval_bytes)
    domains = [load_domain(extra.get("data"), config.train.val_fraction, seq_len, eval_bytes), *[d.data for d in kept]]
    mixture = runs_mixture(chain)
    return {"run": run, "adapter": extra.get("adapter", {}).get("kind"), "seed": config.train.seed,
            "stages": len(chain) - 1, "domains": [extra.get("data"), *[d.path for d in kept]],
            "bpb": [val_bpb(mixture.models[-1], d, seq_len, batch) for d in domains],
            "bpb_mixed": [val_bpb(mixture, d, seq_len, batch) for d in domains]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--eval-bytes", type=int, default=None)
    args = p.parse_args()
    for run in args.runs:
        print(json.dumps(read_run(run, args.eval_bytes)), flush=True)


if __name__ == "__main__":
    main()
