"""`photon bench claims`: the paper's claims as experiments on this machine, stored in
docs/results/claims-SCALE.json and rendered into docs/results/claims-SCALE.md and docs/RESULTS.md.

- `plan.py`: the experiment grid per scale, the arms and their exact overrides, the plan's estimated cost.
- `run.py`: trains the arms (resumable), runs the LR sweeps and the baselines, collects the stored record.
- `record.py`: reads the stored record and derives curves, targets, bytes and modelled wall time from it.
- `verdicts.py`: the verdict rules, one table of thresholds and pure functions.
- `render.py`: the Markdown, from the record, the rules and the fixed prose in `templates/`.
- `plots.py`: the PNGs the report links to (drawn by the benchmark, not by `photon bench report`).

The runner and the report share nothing but the record: rendering never reads a run directory, and
importing the report (as `photon bench report` does) imports neither the runner nor torch.
"""
