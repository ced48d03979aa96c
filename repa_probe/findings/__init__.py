"""What a report says, as numbers: the tables its pages draw, computed from a pipeline.Results (`analyze`,
`compare`) or from a run's values over training steps (`trajectory`). report/ only draws them and writes them out.

  summary.py    where each curve peaks, the held-out drop after the peak, paired deltas B − A per block
  baselines.py  the best block against each baseline of its architecture, held out and paired
  seeds.py      claims about a training recipe: statistics over its seeds
  trends.py     each run's change from the first training step to the last, per block group
  generation.py sample quality (gen.csv) beside the representation measures: their rank correlation
  monitor.py    over training: the step from which REPA's benefit over vanilla stops improving (--align-until)
  similarity.py the SRA view (the self-similarity measure's matrices) and compare's blocks of one model × another's
  (here)        Findings, which gathers them with the samples
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from repa_probe.findings.baselines import baseline_gaps
from repa_probe.findings.generation import correlations, side_by_side
from repa_probe.findings.monitor import monitor_runs
from repa_probe.findings.seeds import Groups, mean_curves, seed_table
from repa_probe.findings.similarity import SelfSimilarity, cross_similarity, self_similarities, similarity_table
from repa_probe.findings.summary import compare_summary, paired_deltas, peak_summary
from repa_probe.findings.trends import block_groups, steps_table, trajectory_summary
from repa_probe.pipeline import AnalyzeConfig, Analysed, Results

KINDS = ("analysis", "comparison", "trajectory")       # the reports: analyze, compare, trajectory


@dataclass
class Findings:
    """One report's numbers. `kind` says which report it is; a field that kind does not have stays empty (None,
    or an empty dict), so a page drawing it draws nothing there."""
    kind: str                                  # one of KINDS
    title: str
    table: pd.DataFrame                        # results.csv: the tidy rows every page may draw from
    config: AnalyzeConfig
    # analyze and compare
    results: Results | None = None             # checkpoints, encoders, curves and images, as the pipeline made them
    aligned: dict[str, int] = field(default_factory=dict)     # {model: REPA's aligned block}
    peaks: pd.DataFrame | None = None          # summary.peak_summary, every model
    compare: pd.DataFrame | None = None        # summary.compare_summary, each later model against the first
    deltas: dict[str, pd.DataFrame] = field(default_factory=dict)      # {later model: paired deltas against the first}
    baseline_gaps: pd.DataFrame | None = None
    seed_groups: Groups = field(default_factory=dict)
    seeds: pd.DataFrame | None = None          # seeds.csv
    seed_means: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)   # {(metric, encoder): means}
    similarity: dict[str, SelfSimilarity] = field(default_factory=dict)     # {model: block × block, t × t CKA}
    cross_similarity: dict[str, np.ndarray] = field(default_factory=dict)    # {later model: first's × its blocks}
    samples: dict[str, np.ndarray] = field(default_factory=dict)             # {model: uint8 image grid}
    # trajectory
    groups: list[list[int]] | None = None      # block groups the trend averages over
    trend: pd.DataFrame | None = None          # trends.trajectory_summary
    provenance: dict[str, dict] = field(default_factory=dict)    # {source or run@step: where its values came from}
    sources: list[str] = field(default_factory=list)
    source: str = ""                           # auto, log or checkpoints
    monitor: list[dict] = field(default_factory=list)   # monitor.monitor_runs: each REPA run against vanilla
    # --gen (any report)
    generation: pd.DataFrame | None = None     # gen.csv: checkpoint × score, FDs with N, paired differences
    gen_points: pd.DataFrame | None = None     # generation.side_by_side: each checkpoint's FD and measures
    gen_correlation: pd.DataFrame | None = None    # generation.correlations: ρ(−FD, measure) with intervals
    gen_reach: pd.DataFrame | None = None      # generation.steps_to_reach: when each later run reaches the first's FD

    @property
    def models(self) -> list[Analysed]:
        return self.results.models if self.results is not None else []

    def tables(self) -> dict[str, pd.DataFrame]:
        """The report's CSV files besides results.csv, by name."""
        tables = {"compare": self.compare, "deltas": pd.concat(self.deltas.values(), ignore_index=True)} \
            if self.compare is not None else {}
        if self.baseline_gaps is not None:
            tables["baseline_gaps"] = self.baseline_gaps
        if self.similarity:
            tables["self_similarity"] = similarity_table(self.similarity)
        if self.generation is not None:
            tables.update(gen=self.generation, gen_correlation=self.gen_correlation)
        if self.gen_reach is not None and len(self.gen_reach):
            tables["gen_reach"] = self.gen_reach
        return {**tables, **({"seeds": self.seeds} if self.seed_groups else {})}


def panels(table: pd.DataFrame, single_block: bool = False) -> list[tuple[str, str]]:
    """(metric, encoder) pairs measured on the models: at every block, or (single_block) at one block each."""
    models = table[(table["kind"] == "model") & (table["block"] >= 0)]
    blocks = models.groupby(["metric", "encoder", "checkpoint"])["block"].nunique()
    one = blocks.groupby(["metric", "encoder"]).max() == 1
    return sorted(pair for pair, single in one.items() if single == single_block)


def aligned_blocks(results: Results) -> dict[str, int]:
    """{model name: REPA's aligned block} for the models that have one."""
    return {a.name: a.ckpt.anatomy.aligned_block for a in results.models if a.ckpt.anatomy.aligned_block}


def analysis_findings(results: Results, table: pd.DataFrame | None = None, *, pages: bool = True) -> Findings:
    """An analysis's or comparison's numbers (deltas are each later model − the first); `table`: results.table(),
    if already made. pages=False leaves out what only the pages show (compare's cross-model block similarity,
    samples)."""
    table, models, aligned = results.table() if table is None else table, results.models, aligned_blocks(results)
    peaks, ref = peak_summary(results), models[0].name
    compare = pd.concat([compare_summary(results, ref, m.name, aligned.get(m.name, aligned.get(ref)))
                         for m in models[1:]], ignore_index=True) if len(models) > 1 else None
    groups, seeds = seed_table(results, peaks, aligned)
    kind = "analysis" if len(models) == 1 else "comparison"
    found = Findings(kind, f"repa-probe {kind}: " + " vs ".join(a.name for a in models), table, results.config,
                     results=results, aligned=aligned, peaks=peaks, compare=compare,
                     deltas={m.name: paired_deltas(results, ref, m.name) for m in models[1:]},
                     baseline_gaps=baseline_gaps(results), seed_groups=groups, seeds=seeds,
                     seed_means={pair: mean_curves(table, groups, *pair) for pair in panels(table)} if groups else {},
                     similarity=self_similarities(models))
    if results.generation is not None:
        with_generation(found, results.generation)
    if pages:
        found.cross_similarity = cross_similarity(models, results.config.device)
        found.samples = samples(results)
    return found


def with_generation(f: Findings, gen: pd.DataFrame) -> Findings:
    """Add gen.csv's rows and what they say beside the representation measures (findings/generation.py)."""
    f.generation = gen
    f.gen_points = side_by_side(gen, f.table, f.kind == "trajectory")
    f.gen_correlation = correlations(f.gen_points, f.config.seed)
    return f


def samples(results: Results) -> dict[str, np.ndarray]:
    """config.samples samples per model that has a velocity, as one image grid each (Euler ODE, 50 steps,
    random classes, no guidance, seeded)."""
    from repa_probe.sampler import image_grid, sample_images
    cfg = results.config
    if not cfg.samples:
        return {}
    return {a.name: image_grid(sample_images(a.ckpt, cfg.samples, vae=cfg.vae, seed=cfg.seed, cfg=1.0))
            for a in results.models if a.ckpt.convention.velocity is not None}


def trajectory_findings(frames: list[pd.DataFrame], curves: dict, provenance: dict[str, dict], depth: int,
                        config: AnalyzeConfig, sources: list[str], source: str,
                        generation: pd.DataFrame | None = None, logs: dict | None = None,
                        reach: pd.DataFrame | None = None) -> Findings:
    """A trajectory's numbers: the rows of every run × step (`frames`, each with run and step columns), the
    curves of the steps analysed here ({(run, step): [Curves]}, for paired changes), the deepest depth,
    gen.csv's rows where the steps' samples were scored, and the monitor over the runs' training logs
    ({run: log.jsonl}): from which step each REPA run's alignment term stops paying against vanilla, and with
    --gen the step at which each later run reaches the first run's last FD (`reach`)."""
    traj, groups = steps_table(frames), block_groups(depth)
    trend = trajectory_summary(traj.fillna({"encoder": ""}), groups, curves, config.seed)
    found = Findings("trajectory", "repa-probe trajectory: " + ", ".join(dict.fromkeys(traj["run"])), traj, config,
                     groups=groups, trend=trend, provenance=provenance, sources=sources, source=source,
                     monitor=monitor_runs(logs or {}), gen_reach=reach)
    return with_generation(found, generation) if generation is not None and len(generation) else found
