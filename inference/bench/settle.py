"""Do ``fit_svi``'s defaults settle? AutoCWM with defaults at several run lengths.

For each target AutoCWM (``--components``, everything else default) is fitted with
``fit_svi``'s defaults for each number of steps in ``--steps``, from the same seed:

- the analytic targets (``pyro_cwm.data.targets``, log Z = 0): KL(q||p) = -ELBO, from
  ``psis_diagnostic``'s draws;
- ``tight-float32`` and ``tight-float64``: the tight regression
  (``pyro_cwm.data.posteriors.tight_regression``, posterior sds 1e-3 of the prior's) in
  each dtype: the worst marginal-mean error in exact posterior sds and the range of the
  sd ratios, from 20,000 draws.

It prints the figures, not a verdict; issue 12's criterion reads them: the shortest run
within 0.02 nats (0.05 sd) of the run four times as long, and no longer run worse. Prints
a table and writes the rows as JSON:

    python -m inference.bench.settle
    python -m inference.bench.settle --targets funnel,tight-float32 --steps 2000,8000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

from inference.diagnostics.psis import psis_diagnostic
from inference.svi import fit_svi
from pyro_cwm.data.posteriors import tight_regression
from pyro_cwm.data.targets import TARGETS
from pyro_cwm.guides import AutoCWM

TIGHT = {"tight-float32": torch.float32, "tight-float64": torch.float64}
DEFAULT_TARGETS = (*TARGETS, *TIGHT)


def settle_row(name: str, steps: int, components: int, samples: int, seed: int) -> dict:
    """One fit of ``name`` for ``steps`` steps: its KL or its mean and sd errors."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    if name in TIGHT:
        model, args, mean, sd = tight_regression(TIGHT[name])
    else:
        target = TARGETS[name]()
        model, args = target.model, ()
    guide = AutoCWM(model, num_components=components)
    started = time.perf_counter()
    fit_svi(model, guide, *args, num_steps=steps, progress=False)
    row = {"target": name, "steps": steps, "map": guide.map_chosen}
    row["time_s"] = time.perf_counter() - started
    if name in TIGHT:
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            draws = guide.get_posterior().sample((samples,)).double()
        ratio = draws.std(0) / sd
        row["mean_err"] = ((draws.mean(0) - mean) / sd).abs().max().item()
        row["sd_min"], row["sd_max"] = ratio.min().item(), ratio.max().item()
    else:
        diagnostic = psis_diagnostic(model, guide, num_samples=samples, seed=seed)
        row["kl"] = -diagnostic.elbo
    return row


def table(rows: list[dict], steps: list[int]) -> str:
    """Targets down, run lengths across: KL, or worst mean error (sd ratio range)."""

    def cell(row: dict) -> str:
        if "kl" in row:
            return f"{row['kl']:.4f}"
        return f"{row['mean_err']:.3f} sd ({row['sd_min']:.2f}-{row['sd_max']:.2f})"

    lines = [
        "| target | map | " + " | ".join(f"{s:,}" for s in steps) + " |",
        "|---|---|" + "---:|" * len(steps),
    ]
    for name in dict.fromkeys(r["target"] for r in rows):
        mine = {r["steps"]: r for r in rows if r["target"] == name}
        cells = [cell(mine[s]) if s in mine else "-" for s in steps]
        lines.append(f"| {name} | {next(iter(mine.values()))['map']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        prog="python -m inference.bench.settle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    p.add_argument("--steps", default="2000,8000,10000")
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--samples", type=int, default=4000, help="draws for KL (tight: 5x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench-out/settle.json")
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in DEFAULT_TARGETS]
    if unknown:
        p.error(f"unknown targets {unknown}; choose from {','.join(DEFAULT_TARGETS)}")
    steps = [int(s) for s in args.steps.split(",")]
    if any(s < 1 for s in steps):
        p.error(f"--steps must be positive, got {args.steps}")
    torch.set_num_threads(args.threads)
    rows = []
    for name in targets:
        for count in steps:
            samples = 5 * args.samples if name in TIGHT else args.samples
            row = settle_row(name, count, args.components, samples, args.seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(table(rows, steps))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
