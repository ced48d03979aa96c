"""Alignment over training (REPA Fig. 2b): probe accuracy and CKNNA with the teacher per block group, at every
saved checkpoint of both runs of a preset, on the same images and noise, with the paired interval of the change
from the first checkpoint to the last.

    python analyses/alignment_over_training.py                    # deep preset → reports/alignment_over_training/
    python analyses/alignment_over_training.py --preset cpu --n 1000
"""
from cifar_runs import REPO, analysis_config, ensure_runs, experiment_args, experiment_parser
from repa_probe.commands import trajectory

if __name__ == "__main__":
    parser = experiment_parser(__doc__)
    parser.set_defaults(preset="deep", n=2000)
    a = experiment_args(__doc__, parser)
    runs = ensure_runs(a.preset)
    print(trajectory([str(runs["vanilla"]), str(runs["repa"])], analysis_config(a.preset, a.n, bootstrap=20,
                                                                                  ts=(0.0, 0.25, 0.5)),
                     str(REPO / "reports" / "alignment_over_training"), source="checkpoints"))
