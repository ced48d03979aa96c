"""`repa-probe analyze / compare / trajectory` end to end: real subprocesses, real CIFAR-10 images,
tiny checkpoints, a real (randomly initialised, explicitly flagged) timm encoder."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from pypdf import PdfReader

from conftest import randomize_, run_cli, tiny_config
from test_report import assert_plain
from repa_probe.checkpoints import save_checkpoint
from repa_probe.encoders import bf16_native
from repa_probe.models import SiT

ENCODER = "vit_tiny_patch16_224"     # built by timm; random weights behind --encoder-random-init
TS = "0,0.5"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cifar_dir):
    """Three tiny checkpoints of one 'run' (steps 10, 20, 30) and a shared feature cache."""
    d = tmp_path_factory.mktemp("analyze")
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    for i, step in enumerate((10, 20, 30)):
        model = randomize_(SiT(cfg), seed=i, std=0.05 * (i + 1))
        save_checkpoint(d / "run" / "checkpoints" / f"{step:07d}.pt", cfg, model.state_dict(),
                        meta={"step": step, "mode": "pixels", "convention": "repa"})
    return d


def common(workdir, cifar_dir, *extra):
    return ["--data", cifar_dir / "test", "--n", "60", "--t", TS, "--encoder", ENCODER, "--encoder-random-init",
            "--bootstrap", "3", "--cache", workdir / "cache", "--quiet", *extra]


def test_analyze_writes_every_row_and_a_summary_that_matches_the_table(workdir, cifar_dir):
    out = workdir / "report_a"
    r = run_cli("analyze", workdir / "run/checkpoints/0000010.pt", *common(workdir, cifar_dir), "--out", out)
    assert r.returncode == 0, r.stderr
    assert "report:" in r.stdout
    res = pd.read_csv(out / "results.csv")
    assert list(res.columns) == ["checkpoint", "kind", "block", "t", "metric", "encoder", "value", "ci_low",
                                 "ci_high", "null_low", "null_mean", "null_high", "n", "k"]
    # every value beside the images and neighbours it was computed at: CKNNA on the 60 images with k = 10, the
    # probe on its 12 test images (no k)
    assert (res.loc[res["metric"] == "cknna", ["n", "k"]] == [60, 10]).all().all()
    assert (res.loc[res["metric"] == "probe_top1", "n"] == 12).all() and res.loc[res["metric"] != "cknna", "k"].isna().all()
    model = res[res["checkpoint"] == "run/0000010"]
    depth = tiny_config().depth
    # every block 0..depth × every t × every metric
    for metric in ("cknna", "probe_top1"):
        rows = model[model["metric"] == metric]
        assert sorted(set(zip(rows["block"], rows["t"]))) == [(b, t) for b in range(depth + 1) for t in (0.0, 0.5)]
        assert rows["value"].notna().all()
    assert (model.loc[model["metric"] == "cknna", "encoder"] == ENCODER).all()
    # every interval is a real interval around its value (bootstrap for CKNNA, Wilson for the probe)
    assert (model["ci_low"] <= model["value"] + 1e-12).all() and (model["value"] <= model["ci_high"] + 1e-12).all()
    assert (model["ci_high"] - model["ci_low"] > 0).all()
    # CKNNA has its permutation null beside it; the probe has none
    cknna_rows = model[model["metric"] == "cknna"]
    assert cknna_rows["null_high"].notna().all() and (cknna_rows["null_low"] <= cknna_rows["null_high"]).all()
    assert model.loc[model["metric"] == "probe_top1", "null_high"].isna().all()
    # baselines present: the raw input pooled like the blocks and as a thumbnail (block −1), the untrained
    # model at every block
    assert set(res.loc[res["kind"].isin(["raw-input", "raw-thumbnail"]), "block"]) == {-1}
    assert set(res["kind"]) == {"model", "untrained", "raw-input", "raw-thumbnail"}
    untrained = res[(res["kind"] == "untrained") & (res["metric"] == "cknna")]
    assert len(untrained) == (depth + 1) * 2
    # the untrained model's adaLN-Zero gates get PyTorch's default init: its blocks differ, a curve over blocks
    for _, g in untrained.groupby("t"):
        assert np.ptp(g["value"].to_numpy()) > 1e-3

    summary = json.loads((out / "summary.json").read_text())
    peaks = summary["peaks"]
    assert len(peaks) == 4 + 3  # (cknna, probe_top1, self_cka_prev) × 2 t, self_cka_tmin at t = 0.5
    for p in (p for p in peaks if not p["metric"].startswith("self_cka_")):     # the two with a held-out drop
        curve = model[(model["metric"] == p["metric"]) & (model["t"] == p["t"]) & (model["block"] >= 1)]
        curve = curve.sort_values("block")
        assert p["best_block"] == int(curve["block"].iloc[int(np.argmax(curve["value"].to_numpy()))])
        assert p["best_value"] == pytest.approx(curve["value"].max())
        assert p["last_value"] == pytest.approx(curve["value"].iloc[-1])
        assert 0 <= p["best_frequency"] <= 1 and p["selected_block"] in range(1, depth + 1)
        assert p["drop_ci_low"] <= p["drop_after"] <= p["drop_ci_high"]
        assert p["peaks_then_drops"] == (p["selected_block"] != depth and p["drop_ci_low"] > 0 and
                                         p["drop_after"] > p["resolution"])
        assert p["n_select"] + p["n_measure"] == (60 if p["metric"] == "cknna" else 12)
        if p["metric"] == "cknna":       # the held-out drop: a difference of two values at n_measure, not at n
            assert (p["n"], p["k"]) == (60, 10)
            assert p["measure_peak_value"] - p["measure_last_value"] == pytest.approx(p["drop_after"])
    assert summary["config"]["encoder_random_init"] is True
    # --encoder-precision auto (the default) checked the encoder on real images and the report says what it chose
    chosen = "bf16" if bf16_native(torch.device("cpu")) else "fp32"
    assert summary["config"]["encoder_precision"] == "auto"
    assert [n for n in summary["notes"] if n.startswith(f"encoder {ENCODER}: {chosen} (--encoder-precision auto")]
    assert "no GPU" not in " ".join(summary["notes"])  # --n was given
    assert_plain(summary["overview"], compare=False)                      # an analysis: peak, then baselines
    assert summary["overview"][0].startswith("At t = 0, ") and " peaks at block " in summary["overview"][0]

    pdf = PdfReader(out / "report.pdf")
    pngs = sorted((out / "figures").glob("*.png"))
    assert len(pdf.pages) == len(pngs) >= 7
    page1, page2 = (pdf.pages[i].extract_text() for i in (0, 1))
    assert all(" ".join(s.split()) in " ".join(page1.split()) for s in summary["overview"])
    assert "RANDOM WEIGHTS" in page2 and "Where each curve peaks" in page2 and "run/0000010" in page2
    assert "n = 60, k = 10" in page2 and "n = 60, k = 10" in summary["overview"][0]    # beside CKNNA's values
    # page 2 lists the baselines computed, and only those (the encoder's own tokens come with --spatial)
    assert summary["baseline_kinds"].keys() == {"untrained", "raw-input", "raw-thumbnail"}
    assert "baseline: raw thumbnail" in page2 and "baseline: encoder" not in page2
    assert "PyTorch's default Linear init" in " ".join(page2.split())                 # which untrained model
    assert not list(workdir.glob(".report_a.partial-*"))
    assert_held_out_gaps(out, summary, depth)


def assert_held_out_gaps(out, summary, depth) -> None:
    """baseline_gaps.csv: each model curve's best block (chosen on half A, as for its drop) − each baseline's best
    block (the untrained model's chosen on half A too; the raw input is one 'block', −1), on half B, paired."""
    gaps = pd.read_csv(out / "baseline_gaps.csv").fillna({"encoder": ""})       # '' (the probe's) reads as NaN
    pd.testing.assert_frame_equal(gaps, pd.DataFrame(summary["baseline_gaps"]), check_dtype=False)
    assert len(gaps) == 3 * 2 * 2 and set(gaps["kind"]) == {"untrained", "raw-input", "raw-thumbnail"}   # ×metric×t
    peaks = pd.DataFrame(summary["peaks"]).set_index(["checkpoint", "metric", "t"])["selected_block"]
    assert (gaps["block"].to_numpy() == peaks.loc[list(zip(gaps["checkpoint"], gaps["metric"], gaps["t"]))]).all()
    assert set(gaps.loc[gaps["kind"] != "untrained", "baseline_block"]) == {-1}
    assert gaps.loc[gaps["kind"] == "untrained", "baseline_block"].between(1, depth).all()
    assert np.allclose(gaps["gap"], gaps["value"] - gaps["baseline_value"])
    assert ((gaps["ci_low"] <= gaps["gap"]) & (gaps["gap"] <= gaps["ci_high"])).all()
    claims = np.sign(gaps["ci_low"].clip(lower=0) * (gaps["gap"] > gaps["resolution"]) +
                     gaps["ci_high"].clip(upper=0) * (gaps["gap"] < -gaps["resolution"]))
    assert (gaps["verdict"] == claims).all()


def test_compare_overlays_checkpoints_with_deltas(workdir, cifar_dir):
    out = workdir / "report_ab"
    # a run folder stands for its latest checkpoint (step 30) and is named after the run
    # matplotlib warns when more than figure.max_open_warning figures are open (20 by default; 5 here, set through
    # its own config file): each page is drawn as it is saved, so a report of more pages than that gives none
    mpl = workdir / "mplconfig"
    mpl.mkdir(exist_ok=True)
    (mpl / "matplotlibrc").write_text("figure.max_open_warning: 5\n")
    r = run_cli("compare", workdir / "run/checkpoints/0000010.pt", workdir / "run",
                *common(workdir, cifar_dir), "--out", out, env={"MPLCONFIGDIR": str(mpl)})
    assert r.returncode == 0, r.stderr
    assert len(list((out / "figures").glob("*.png"))) > 5 and "figures have been opened" not in r.stderr
    res = pd.read_csv(out / "results.csv")
    assert {"run/0000010", "run"} <= set(res["checkpoint"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoints"]["run"]["step"] == 30
    comp = pd.read_csv(out / "compare.csv")
    a = res[res["checkpoint"] == "run/0000010"].set_index(["metric", "t", "block"])["value"]
    b = res[res["checkpoint"] == "run"].set_index(["metric", "t", "block"])["value"]
    for row in summary["compare"]:
        delta = (b - a).xs((row["metric"], row["t"]), level=["metric", "t"])
        delta = delta[delta.index >= 1]
        assert row["max_delta"] == pytest.approx(delta.max())
        assert row["mean_delta"] == pytest.approx(delta.mean())
    assert len(comp) == len(summary["compare"]) == 4 + 3       # and self_cka_prev × 2 t, self_cka_tmin at t = 0.5
    # per-block deltas with paired intervals, strictly narrower than the marginal rule's (B's low end above
    # A's high end, i.e. a difference interval as wide as both intervals together): the same images, noise
    # and replicates for both checkpoints
    deltas = pd.read_csv(out / "deltas.csv")
    marginal = res.set_index(["checkpoint", "metric", "t", "block"])
    paired = deltas[deltas["metric"] == "cknna"]
    assert len(paired) == 2 * (tiny_config().depth + 1)
    for r in paired.itertuples():
        wa = marginal.loc[("run/0000010", "cknna", r.t, r.block)]
        wb = marginal.loc[("run", "cknna", r.t, r.block)]
        assert r.ci_low <= r.delta <= r.ci_high
        assert r.ci_high - r.ci_low < (wa.ci_high - wa.ci_low) + (wb.ci_high - wb.ci_low)
        # the simultaneous band over the 3 blocks ≥ 1 × 2 t holds the pointwise interval, at the same n and k
        assert r.sim_low < r.ci_low and r.ci_high < r.sim_high and (r.n, r.k, r.sim_cells) == (60, 10, 6)
    assert {"b_better_blocks_pointwise", "b_worse_blocks_pointwise", "n", "k"} <= set(comp.columns)
    assert len(PdfReader(out / "report.pdf").pages) == len(list((out / "figures").glob("*.png")))


def test_trajectory_over_a_run_folder(workdir, cifar_dir):
    out = workdir / "report_traj"
    r = run_cli("trajectory", workdir / "run", *common(workdir, cifar_dir), "--out", out)
    assert r.returncode == 0, r.stderr
    res = pd.read_csv(out / "results.csv")
    assert sorted(res["step"].unique()) == [10, 20, 30]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups"] == [[1], [2], [3]]
    t0 = [row for row in summary["trend"] if row["metric"] == "cknna" and row["t"] == 0 and row["blocks"] == "3–3"]
    first = res[(res["step"] == 10) & (res["metric"] == "cknna") & (res["t"] == 0) & (res["block"] == 3)]["value"]
    assert t0[0]["first"] == pytest.approx(float(first.iloc[0]))
    # the change from the first to the last step has a paired interval (the same images and replicates)
    assert all(r["change_ci_low"] <= r["change"] <= r["change_ci_high"] for r in summary["trend"])


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case", ["missing checkpoint", "folder without checkpoints", "not an image folder",
                                  "unknown encoder", "unwritable out"])
def test_bad_input_is_one_line_exit_2_and_leaves_no_report(workdir, cifar_dir, tmp_path, case):
    ckpt, data, encoder, out = workdir / "run/checkpoints/0000010.pt", cifar_dir / "test", ENCODER, tmp_path / "rep"
    expect = {"missing checkpoint": "does not exist", "folder without checkpoints": "folder without checkpoints",
              "not an image folder": "--data",
              "unknown encoder": "unknown encoder 'dinov3-vit-b'", "unwritable out": "--out"}[case]
    if case == "missing checkpoint":
        ckpt = tmp_path / "nope.pt"
    elif case == "folder without checkpoints":
        ckpt = tmp_path / "empty_run"
        ckpt.mkdir()
    elif case == "not an image folder":
        data = tmp_path / "texts"
        (data / "a").mkdir(parents=True)
        (data / "a" / "notes.txt").write_text("not an image")
    elif case == "unknown encoder":
        encoder = "dinov3-vit-b"
    else:
        (tmp_path / "file").write_text("a file, not a folder")
        out = tmp_path / "file" / "rep"
    r = run_cli("analyze", ckpt, "--data", data, "--n", "40", "--encoder", encoder, "--encoder-random-init",
                "--cache", tmp_path / "cache", "--quiet", "--out", out)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repa-probe: error:") and expect in lines[0], r.stderr
    assert not (tmp_path / "rep").exists()
    assert not list(tmp_path.glob(".rep*"))


def test_unlabelled_images_still_get_cknna_and_no_encoder_still_gets_probes(workdir, cifar_dir, tmp_path):
    import shutil
    flat = tmp_path / "generated"
    flat.mkdir()
    for f in sorted((cifar_dir / "test" / "cat").iterdir())[:30]:
        shutil.copy(f, flat / f.name)
    ckpt = workdir / "run/checkpoints/0000010.pt"
    fast = ["--t", "0", "--bootstrap", "0", "--no-baselines", "--cache", workdir / "cache", "--quiet"]
    r = run_cli("analyze", ckpt, "--data", flat, "--n", "30", "--encoder", ENCODER, "--encoder-random-init", *fast,
                "--out", tmp_path / "unlabelled")
    assert r.returncode == 0, r.stderr
    res = pd.read_csv(tmp_path / "unlabelled" / "results.csv")
    assert set(res["metric"]) == {"cknna", "self_cka_prev"}       # at one t, no self_cka_tmin
    assert any("no probe" in note for note in json.loads((tmp_path / "unlabelled" / "summary.json").read_text())["notes"])
    fast[fast.index("--cache") + 1] = tmp_path / "cache"
    r = run_cli("analyze", ckpt, "--data", cifar_dir / "test", "--n", "40", *fast, "--out", tmp_path / "no_encoder")
    assert r.returncode == 0, r.stderr
    no_encoder = pd.read_csv(tmp_path / "no_encoder" / "results.csv")
    assert set(no_encoder["metric"]) == {"probe_top1", "self_cka_prev"}
    # the probe splits the 40 images: their features are read once, not captured again per split
    assert len(list((tmp_path / "cache" / "blocks").iterdir())) == 1


def test_the_untrained_baseline_has_its_gates_initialised_per_block_seeded_and_cached_under_its_init(tmp_path,
                                                                                                     cifar_dir):
    """adaLN-Zero would make every untrained block the identity (the baseline = the patch embedding at every block):
    its zero-initialised linears get PyTorch's default init instead, one draw per block, and the rest is DiT's init;
    its features are cached under a key that names that init."""
    from repa_probe.capture import CaptureConfig, extract
    from repa_probe.checkpoints import UNTRAINED_INIT
    from repa_probe.data import ImageDataset
    from repa_probe.families.sit import as_checkpoint
    cfg = tiny_config(input_size=32, z_dims=[], encoder_depth=0)
    ckpt = as_checkpoint(randomize_(SiT(cfg)))
    fresh, again, other = (ckpt.family.untrained(ckpt, seed) for seed in (0, 0, 1))
    assert fresh.provenance.sha256 == again.provenance.sha256 != other.provenance.sha256
    assert fresh.provenance.weights == UNTRAINED_INIT
    torch.manual_seed(0)
    dit = SiT(cfg).state_dict()                          # DiT's own init from the same seed: gates at zero
    gates = [b.adaLN_modulation[-1].weight for b in fresh.model.blocks]
    assert all(g.abs().min() > 0 for g in gates) and not torch.equal(gates[0], gates[1])     # a draw per block
    assert all(torch.equal(p, dit[k]) for k, p in fresh.model.state_dict().items()
               if "adaLN_modulation" not in k and "final_layer" not in k)
    dataset = ImageDataset(str(cifar_dir / "test"), 32, indices=np.arange(8))
    blocks = np.asarray(extract(fresh, dataset, CaptureConfig(ts=(0.0,)), cache_dir=tmp_path, quiet=True).blocks)[0]
    assert all(np.abs(blocks[i + 1] - blocks[i]).max() > 1e-3 for i in range(cfg.depth))
    manifests = [m.read_text() for m in tmp_path.glob("blocks/*/manifest.json")]
    assert len(manifests) == 1 and UNTRAINED_INIT in manifests[0]


def test_compare_under_torchrun_writes_one_report_with_the_numbers_of_one_process(workdir, cifar_dir, tmp_path):
    """Two gloo processes: rank 0 holds --out and writes the report, rank 1 computes its share beside it (it used
    to stop on the folder's lock); every value equals one process's. (`--` keeps torchrun's own parser off --n.)"""
    import os
    import subprocess
    import sys
    from conftest import REPO
    ckpts = [workdir / "run/checkpoints/0000010.pt", workdir / "run/checkpoints/0000030.pt"]
    args = ["compare", *ckpts, *common(workdir, cifar_dir), "--no-self-similarity"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "repa_probe", "--", *map(str, args), "--out", str(tmp_path / "two")], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("report:") == 1                       # rank 0 alone reports
    one = run_cli(*args, "--out", tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    a, b = (pd.read_csv(tmp_path / side / "results.csv") for side in ("one", "two"))
    assert a.drop(columns=["value", "ci_low", "ci_high"]).equals(b.drop(columns=["value", "ci_low", "ci_high"]))
    for column in ("value", "ci_low", "ci_high"):
        np.testing.assert_allclose(b[column], a[column], rtol=1e-5, atol=1e-6)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]   # no partial folder left behind
