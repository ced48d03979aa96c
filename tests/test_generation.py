"""Sample quality (issue 27): the Fréchet distance against pytorch-fid's formula and a 50-digit reference, the
Inception network against pytorch-fid and torch-fidelity on the same (random) weights, IS and precision/recall
against direct computations, statistics summed over two real gloo processes, paired FD intervals on real tiny
SiT models and real CIFAR-10 images."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
import warnings

import mpmath
import numpy as np
import pytest
import torch

from conftest import REPO, randomize_, tiny_config
from test_download import server  # noqa: F401  (the local HTTP server fixture)
from repa_probe import generation as G
from repa_probe.checkpoints import save_checkpoint
from repa_probe.config import AnalyzeConfig
from repa_probe.encoders import load_encoder
from repa_probe.errors import UserError
from repa_probe.families import load_checkpoint
from repa_probe.fid import FD, GaussianStats, frechet_distance, inception_score, precision_recall, same_n
from repa_probe.inception import WEIGHTS_FILE, InceptionV3, load_inception
from repa_probe.models import SiT
from repa_probe.sampler import sample_indexed

pytestmark = pytest.mark.usefixtures("one_thread")
pytorch_fid = pytest.importorskip("pytorch_fid.fid_score")
TEACHER = "cifar-ssl-resnet"


def scipy_fd(mu1, s1, mu2, s2):
    """pytorch-fid's calculate_frechet_distance, its ε message captured: (value, took the ε path)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = pytorch_fid.calculate_frechet_distance(mu1, s1, mu2, s2)
    return value, "adding" in out.getvalue()


def exact_fd(a, b, mu1, mu2):
    """FD of N(mu1, aaᵀ), N(mu2, bbᵀ) in 50 digits: tr (Σ₁^½Σ₂Σ₁^½)^½ is the nuclear norm of aᵀb."""
    mpmath.mp.dps = 50
    am, bm = mpmath.matrix(a.tolist()), mpmath.matrix(b.tolist())
    s1, s2 = am * am.T, bm * bm.T
    trace = sum(s1[i, i] + s2[i, i] for i in range(s1.rows))
    return float(sum((mpmath.mpf(x) - mpmath.mpf(y)) ** 2 for x, y in zip(mu1, mu2)) + trace
                 - 2 * sum(mpmath.svd_r(am.T * bm, compute_uv=False)))


#################################################################################
#                               Fréchet distance                                #
#################################################################################

@pytest.mark.parametrize("dim, n", [(64, 500), (256, 2000)])
def test_fd_equals_pytorch_fids_formula(dim, n):
    rng = np.random.default_rng(dim)
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    x = np.abs(rng.standard_normal((n, dim)) @ mix + 0.3)                  # ReLU-like features, correlated
    y = np.abs(1.1 * rng.standard_normal((n, dim)) @ mix + 0.25)
    sx, sy = GaussianStats.of(x), GaussianStats.of(y)
    np.testing.assert_allclose(sx.sigma, np.cov(x, rowvar=False), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sx.mu, x.mean(0), rtol=0, atol=1e-14)
    reference, eps_path = scipy_fd(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert not eps_path
    assert abs(frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma) - reference) < 1e-6   # measured ~1e-13


def test_fd_is_exact_where_pytorch_fid_needs_its_eps_fix():
    # Exactly singular covariances (rank 2 in 6 dimensions): scipy's sqrtm of the product is not finite, so
    # pytorch-fid adds 1e-6·I to both and its value moves by ~1e-2.
    a = np.array([[1, 0], [-1, 1], [1, -1], [0, 1], [1, 0], [1, 1]], dtype=float)
    b = np.array([[-1, -1], [-1, 0], [-1, -1], [-1, 0], [0, -1], [1, 1]], dtype=float)
    mu1, mu2 = np.zeros(6), np.full(6, 0.5)
    s1, s2 = a @ a.T, b @ b.T
    theirs, eps_path = scipy_fd(mu1, s1, mu2, s2)
    assert eps_path
    exact = exact_fd(a, b, mu1, mu2)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert abs(ours - exact) < 1e-10
    assert abs(theirs - exact) > 1e-3                                    # the ε fix is not the distance
    eye = 1e-6 * np.eye(6)                                               # its ε path is our formula on Σ + εI
    assert abs(frechet_distance(mu1, s1 + eye, mu2, s2 + eye) - 2 * 6 * 1e-6 - theirs) < 1e-6


@pytest.mark.parametrize("dim, r1, r2", [(8, 3, 5), (16, 6, 10), (24, 20, 5)])
def test_fd_on_rank_deficient_covariances_equals_a_50_digit_reference(dim, r1, r2):
    rng = np.random.default_rng(dim)
    a, b = rng.standard_normal((dim, r1)), rng.standard_normal((dim, r2))
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    exact = exact_fd(a, b, mu1, mu2)
    assert abs(frechet_distance(mu1, a @ a.T, mu2, b @ b.T) - exact) < 1e-9 * max(1.0, exact)
    assert abs(scipy_fd(mu1, a @ a.T, mu2, b @ b.T)[0] - exact) < 1e-4   # scipy agrees, to fewer digits


def test_fds_of_different_n_are_never_compared():
    assert same_n(FD(1.0, 50), FD(2.0, 50)) == 50
    with pytest.raises(UserError, match=r"different numbers of samples \(N=32, N=64\).*same --gen N"):
        same_n(FD(1.0, 64), FD(2.0, 32))


#################################################################################
#                      Inception Score, precision and recall                    #
#################################################################################

def test_inception_score_equals_a_direct_computation_and_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = torch.randn(200, 12, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(logits.double(), 1).numpy()
    direct = []
    for part in np.split(p, 10):                                         # 10 splits of 20, as ADM's 5 000 of 50 000
        marginal = part.mean(0)
        direct.append(np.exp(np.mean([np.sum(q * (np.log(q) - np.log(marginal))) for q in part])))
    assert abs(inception_score(logits) - np.mean(direct)) < 1e-12
    assert np.isfinite(inception_score(logits[:6]))                      # fewer samples than splits
    theirs = isc_features_to_metric(logits, splits=10, shuffle=False)["inception_score_mean"]
    assert abs(inception_score(logits) - theirs) < 1e-5


def test_precision_recall_equal_a_direct_reference():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((60, 5)), rng.standard_normal((45, 5)) * 1.3 + 0.4

    def radius(x, i, k=3):                                               # distance to the k-th nearest other row
        return sorted(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)[k - 1]

    def share_inside(points, centres):
        radii = [radius(centres, j) for j in range(len(centres))]
        return np.mean([any(np.linalg.norm(p - c) <= r for c, r in zip(centres, radii)) for p in points])

    precision, recall = precision_recall(real, fake, k=3)
    assert precision == share_inside(fake, real) and recall == share_inside(real, fake)
    assert 0 < precision < 1 and 0 < recall < 1


#################################################################################
#                                 Inception-v3                                  #
#################################################################################

def random_inception_file(path, seed: int = 0):
    """FID's Inception-v3 with random weights (batch-norm statistics included), saved in pytorch-fid's layout."""
    model, g = InceptionV3(), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, v in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith(("running_var", "bn.weight")):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            elif name.endswith("conv.weight"):
                v.copy_(torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5)
            else:
                v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return random_inception_file(tmp_path_factory.mktemp("torch_home") / "hub" / "checkpoints" / WEIGHTS_FILE)


def cifar_uint8(cifar_dir, n: int, size: int = 32) -> torch.Tensor:
    from repa_probe.data import ImageDataset
    dataset = ImageDataset(cifar_dir / "test", size, indices=np.arange(n) * 613)
    return torch.stack([dataset[i][0] for i in range(n)])


def test_inception_gives_pytorch_fids_and_torch_fidelitys_activations(inception_file, cifar_dir, monkeypatch):
    from pytorch_fid.inception import InceptionV3 as PytorchFid
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    images = cifar_uint8(cifar_dir, 2)
    # pytorch-fid reads its weights from torch hub's cache: the random file, put where it looks
    monkeypatch.setenv("TORCH_HOME", str(inception_file.parents[2]))
    theirs = PytorchFid([3]).eval()
    spatial = []
    theirs.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, out: spatial.append(out))   # Mixed_6d's conv
    with torch.no_grad():
        pool = theirs(images.float() / 255)[0].flatten(1)
    ours = load_inception(inception_file, preprocessing="pytorch-fid")(images)
    scale = pool.abs().max()
    assert (ours["pool"] - pool).abs().max() <= 1e-5 * scale                         # measured: 0 (bitwise)
    torch.testing.assert_close(ours["spatial"], spatial[0][:, :7].permute(0, 2, 3, 1).flatten(1), rtol=0, atol=1e-5)

    fidelity = FeatureExtractorInceptionV3("inception", ["2048", "logits_unbiased"],
                                           feature_extractor_weights_path=str(inception_file))
    with torch.no_grad():
        pool, logits = fidelity(images)
    adm = load_inception(inception_file)(images)                                    # ADM's preprocessing
    assert (adm["pool"] - pool).abs().max() <= 1e-5 * pool.abs().max()              # measured ~1.5e-7 relative
    assert (adm["logits"] - logits).abs().max() <= 1e-5 * logits.abs().max()
    assert adm["spatial"].shape == (2, 17 * 17 * 7)


def test_inception_weights_from_a_folder_or_downloaded_else_one_error(inception_file, server, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    monkeypatch.setenv("REPA_PROBE_WEIGHTS", str(tmp_path / "weights"))
    with pytest.raises(UserError, match=r"--inception-weights PATH.*--download"):
        load_inception()
    with pytest.raises(UserError, match=r"--inception-weights '.*nothing.pth' is not a file"):
        load_inception(tmp_path / "nothing.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not pytorch-fid's layout|do not fit"):
        load_inception(tmp_path / "other.pth")
    (server.folder / WEIGHTS_FILE).write_bytes(inception_file.read_bytes())
    fetched = load_inception(download=True)
    assert (tmp_path / "weights" / WEIGHTS_FILE).is_file()
    assert load_inception().weights_sha256 == fetched.weights_sha256 == load_inception(inception_file).weights_sha256


#################################################################################
#                    Samples of real tiny models, paired                        #
#################################################################################

def tiny_checkpoint(path, seed: int):
    model = randomize_(SiT(tiny_config(input_size=32)), seed=seed)
    return save_checkpoint(path, model.config, model.state_dict(), meta={"mode": "pixels"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    return [load_checkpoint(tiny_checkpoint(folder / f"tiny{s}.pt", s)) for s in (0, 1)]


@pytest.fixture(scope="module")
def teacher():
    return G.EncoderSpace(load_encoder(TEACHER), grid=16)


@pytest.fixture(scope="module")
def reference(teacher, cifar_dir, tmp_path_factory):
    return G.reference_from_folder(cifar_dir / "test", [teacher], image_size=32, n=60,
                                   cache=tmp_path_factory.mktemp("cache"))


FAST = dict(sampler="ode", steps=3)


def test_fd_in_an_encoders_space_equals_a_direct_computation(tiny, teacher, reference, cifar_dir):
    sampling = G.Sampling(24, **FAST, batch_size=10)
    scores = G.generation_scores(tiny[0], sampling, [teacher], reference, name="a")
    fd = scores.scores[f"FD_{TEACHER}"]
    assert isinstance(fd, FD) and fd.n == 24 and str(fd).endswith("(N=24)")

    # by hand: the samples, REPA's uint8 quantisation, the teacher's pooled tokens, np.cov, pytorch-fid's formula
    from repa_probe.data import ImageDataset, list_images, select_subset
    x0 = torch.cat([sample_indexed(tiny[0], range(i, min(i + 7, 24)), seed=0, **FAST) for i in range(0, 24, 7)])
    images = (127.5 * x0 + 128).clamp(0, 255).to(torch.uint8)
    encoder = load_encoder(TEACHER)
    with torch.no_grad():
        fake = encoder.encode(images.float() / 255, 16)[1].double().numpy()
    subset = select_subset(list_images(cifar_dir / "test")[1], 60, 0)
    ds = ImageDataset(cifar_dir / "test", 32, subset)
    with torch.no_grad():
        real = encoder.encode(torch.stack([ds[i][0] for i in range(len(ds))]).float() / 255, 16)[1].double().numpy()
    np.testing.assert_allclose(scores.features[f"{TEACHER}/pool"], fake, rtol=1e-4, atol=1e-5)   # batches of 10 vs 7
    direct, _ = scipy_fd(fake.mean(0), np.cov(fake, rowvar=False), real.mean(0), np.cov(real, rowvar=False))
    assert abs(fd.value - direct) < 1e-4 * max(1.0, direct)


def test_sampling_runs_the_model_under_the_analysis_precision_and_compiled_blocks(tiny):
    """--gen samples with the fast paths of the trainer and the capture (issue 27, item 7): bf16 autocast (the
    blocks' matmuls compute in bf16, the state stays float64 and the samples stay close) and torch.compile'd blocks (the
    eager samples up to rounding, the model's own forward back afterwards)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    ckpt, seen = tiny[0], []
    block = ckpt.family.blocks(ckpt.model)[0]
    linear = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    try:
        eager = sample_indexed(ckpt, range(3), **FAST)
        bf16 = sample_indexed(ckpt, range(3), **FAST, precision="bf16")
    finally:
        handle.remove()
    assert seen[:3] == [torch.float32] * 3 and set(seen[3:]) == {torch.bfloat16}
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, eager)
    assert (bf16 - eager).abs().max() < 0.1 * eager.abs().max()
    torch._dynamo.reset()
    counters.clear()
    compiled = sample_indexed(ckpt, range(3), **FAST, compile=True)
    assert counters["stats"]["unique_graphs"] >= 1 and "forward" not in block.__dict__
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert G.sampling_of(AnalyzeConfig(data="d", gen=8, precision="auto"), "cpu").precision == "fp32"
    assert G.sampling_of(AnalyzeConfig(data="d", gen=8, precision="auto", compile=True), "cuda").precision == "bf16"


def test_the_seed_changes_the_samples_and_seed_0_keeps_its_draws(tiny):
    """A CPU torch.Generator keeps only the low 32 bits of its seed: with the set's seed in the high bits,
    --seed 1 drew exactly --seed 0's samples."""
    from repa_probe.sampler import sample_seed
    a, b = (sample_indexed(tiny[0], range(4), seed=seed, **FAST) for seed in (0, 1))
    assert not torch.equal(a, b)
    assert sample_indexed(tiny[0], range(4), seed=1, **FAST).equal(b)
    assert [sample_seed(0, i) for i in range(4)] == [0, 1, 2, 3]      # seed 0: the committed reports' draws
    draws = {sample_seed(s, i) for s in range(3) for i in range(1000)}
    assert len(draws) == 3000 and max(draws) < 2 ** 32


def test_paired_interval_of_an_fd_difference(tiny, teacher, reference):
    sampling = G.Sampling(24, **FAST)
    a, b = (G.generation_scores(ckpt, sampling, [teacher], reference, name=n) for ckpt, n in zip(tiny, "ab"))
    again = G.generation_scores(tiny[0], sampling, [teacher], reference, name="a again")
    np.testing.assert_array_equal(again.features[f"{TEACHER}/pool"], a.features[f"{TEACHER}/pool"])

    score = f"FD_{TEACHER}"
    d = G.compare_fd(a, b, reference, score, n_boot=8, seed=0)
    assert d["n"] == 24 and abs(d["difference"] - (b.scores[score].value - a.scores[score].value)) < 1e-9
    assert d["low"] < d["difference"] < d["high"]
    # a replicate is the FD difference recomputed on the same resampled sample indices of both checkpoints
    from repa_probe.stats import resamples
    rows = resamples(24, 8, 0)[3]
    ref = reference.stats[f"{TEACHER}/pool"]
    fa, fb = (s.features[f"{TEACHER}/pool"][rows].astype(np.float64) for s in (a, b))
    by_hand = (scipy_fd(fb.mean(0), np.cov(fb, rowvar=False), ref.mu, ref.sigma)[0]
               - scipy_fd(fa.mean(0), np.cov(fa, rowvar=False), ref.mu, ref.sigma)[0])
    assert abs(d["replicates"][3] - by_hand) < 1e-6
    same = G.compare_fd(a, again, reference, score, n_boot=4)
    assert same["difference"] == 0 and same["low"] == same["high"] == 0
    # each checkpoint's replicates are computed once and shared by every difference that uses them
    kept = a.replicates[(score, 8, 0)]
    assert G.compare_fd(a, again, reference, score, n_boot=8, seed=0)["replicates"].shape == (8,)
    assert a.replicates[(score, 8, 0)] is kept and np.array_equal(d["replicates"], b.replicates[(score, 8, 0)] - kept)

    fewer = dataclasses.replace(b, sampling=G.Sampling(16, **FAST), scores={score: FD(b.scores[score].value, 16)})
    with pytest.raises(UserError, match="different numbers of samples"):
        G.compare_fd(a, fewer, reference, score)
    other_seed = dataclasses.replace(b, sampling=G.Sampling(24, seed=1, **FAST))
    with pytest.raises(UserError, match="not paired"):
        G.compare_fd(a, other_seed, reference, score)


WORKER = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from repa_probe import generation as G
from repa_probe.encoders import load_encoder
from repa_probe.families import load_checkpoint
from repa_probe.runtime import init_distributed, rank, shutdown_distributed
init_distributed()
ckpt = load_checkpoint(sys.argv[1])
stats, feats = G.sample_features(ckpt, [G.EncoderSpace(load_encoder("cifar-ssl-resnet"), 16)],
                                 G.Sampling(10, sampler="sde", steps=3, batch_size=3))
s = stats["cifar-ssl-resnet/pool"]
if rank() == 0:
    np.savez(sys.argv[2], n=s.n, sum=s.sum, sum_outer=s.sum_outer, features=feats["cifar-ssl-resnet/pool"])
shutdown_distributed()   # as the CLI does: a rank leaving a live gloo group may abort
"""


def test_statistics_summed_over_two_gloo_processes_equal_one_process(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", 0)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = {"two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
            "one": [sys.executable]}
    out = {}
    for name, launcher in runs.items():
        r = subprocess.run([*launcher, str(tmp_path / "worker.py"), str(ckpt), str(tmp_path / f"{name}.npz")],
                           capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = np.load(tmp_path / f"{name}.npz")
    two, one = out["two"], out["one"]
    assert int(two["n"]) == int(one["n"]) == 10
    # every sample (SDE noise included) is the same whichever rank and batch drew it
    np.testing.assert_allclose(two["features"], one["features"], rtol=1e-5, atol=1e-6)
    # the summed statistics are those of all ten samples: float64 sums, equal up to the order of additions
    whole = GaussianStats.of(two["features"])
    np.testing.assert_allclose(two["sum"], whole.sum, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(two["sum_outer"], whole.sum_outer, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(two["sum_outer"], one["sum_outer"], rtol=1e-5, atol=1e-6)


#################################################################################
#                          ADM reference batches (.npz)                         #
#################################################################################

def test_an_adm_reference_batch_is_read_offline_with_its_precomputed_statistics(teacher, cifar_dir, tmp_path,
                                                                                  inception_file):
    images = cifar_uint8(cifar_dir, 12)
    nhwc = images.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "ref.npz", arr_0=nhwc)
    ref = G.load_reference(tmp_path / "ref.npz", [teacher])
    with torch.no_grad():
        direct = teacher.encoder.encode(images.float() / 255, 16)[1].double().numpy()
    np.testing.assert_allclose(ref.stats[f"{TEACHER}/pool"].sigma, np.cov(direct, rowvar=False), atol=1e-6)

    inception = G.InceptionSpace(load_inception(inception_file))
    mu, sigma = np.arange(2048.0), np.eye(2048) * 2
    np.savez(tmp_path / "adm.npz", arr_0=nhwc[:3], mu=mu, sigma=sigma, mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    adm = G.load_reference(tmp_path / "adm.npz", [inception])
    np.testing.assert_allclose(adm.stats["inception/pool"].mu, mu, atol=1e-9)
    np.testing.assert_allclose(adm.stats["inception/pool"].sigma, sigma, atol=1e-9)
    assert adm.features["inception/pool"].shape == (3, 2048)              # precision/recall use the images

    np.savez(tmp_path / "bad.npz", images=nhwc)
    with pytest.raises(UserError, match=r"--gen-reference '.*bad.npz' is not an ADM reference batch"):
        G.load_reference(tmp_path / "bad.npz", [teacher])
    with pytest.raises(UserError, match="neither an image folder nor an ADM"):
        G.load_reference(tmp_path / "missing", [teacher], image_size=32)
