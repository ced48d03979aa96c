"""REPA's successors on the same seeds, analysed together (issue 29, item 5):

    python analyses/successors.py                    # the "small" preset on 2 CPU cores → reports/successors/
    python analyses/successors.py --preset deep      # the 28-block preset (hours of CPU)

Trains (or finishes) vanilla, REPA (λ 0.5), REPA switched off at half the steps (HASTE's --align-until), SRA
(--self-align 0.5), Dispersive Loss (--dispersive 0.25) and REG (REPA + the teacher's pooled feature as its class
token, --reg-cls 0.03) with analyses/cifar_runs.py: one seed, so every arm
starts from the same SiT and sees the same images, t and noise. Then one `compare` of their final EMA models on
the same n cifar10/test images and noise: CKNNA against the bundled teacher and the linear probe at every block,
paired intervals against vanilla, and sample quality (FD in the teacher's space, --gen samples each, the same
noise and labels for every arm). The compared files are the arms' fp16 EMA weights, exported with their training
logs, configs and SHA256SUMS into reports/weights/cifar_<preset>/ (cifar_runs.exported), so the report re-makes.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from cifar_runs import DATA, REPO, analysis_config, experiment_args, experiment_parser, exported

sys.path.insert(0, str(REPO))
from repa_probe.commands import compare  # noqa: E402

ARMS = ("vanilla", "repa", "repa-stop", "sra", "dispersive", "reg")


def main() -> None:
    ap = experiment_parser(__doc__)
    ap.set_defaults(preset="small")
    ap.add_argument("--gen", type=int, default=1000, help="samples per arm for FD (default 1000; 0 = none)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "successors")
    a = experiment_args(__doc__, ap)
    weights = exported(a.preset, arms=ARMS)          # trains or finishes the arms first
    config = analysis_config(a.preset, a.n, ts=(0.0, 0.25, 0.5), baselines=False, gen=a.gen, gen_sampler="ode",
                             gen_steps=50, gen_reference=os.path.relpath(DATA / "test"),
                             gen_spaces=("cifar-ssl-resnet",),
                             notes=[f"preset {a.preset}: REPA's successors on one training seed (analyses/successors.py)"])
    start = time.perf_counter()
    print(compare([os.path.relpath(w) for w in weights.values()], config, os.path.relpath(a.out)),
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
