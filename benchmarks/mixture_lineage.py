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

from fractalmoe.checkpoint import load_model_from_run, load_run_config, run_extra
from fractalmoe.evaluate import val_bpb
from fractalmoe.finetune import kept_domains, lineage, load_domain
from fractalmoe.mixture import PosteriorMixture


def read_run(run: str, eval_bytes: int | None) -> dict:
    chain = lineage(run)
    config = load_run_config(chain[-1])
    seq_len, batch = config.model.seq_len, config.train.batch_size
    own = run_extra(chain[-1]).get("data")
    domains = [load_domain(own, config.train.val_fraction, seq_len, eval_bytes)]
    domains += [d.data for d in kept_domains(chain[:-1], eval_bytes)]
    models = [load_model_from_run(r)[0] for r in chain]
    mixture = PosteriorMixture(models)
    return {"run": run, "adapter": run_extra(chain[-1]).get("adapter", {}).get("kind"), "seed": config.train.seed,
            "stages": len(chain) - 1, "domains": [own, *[run_extra(r).get("data") for r in chain[:-1]]],
            "bpb": [val_bpb(models[-1], d, seq_len, batch) for d in domains],
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
