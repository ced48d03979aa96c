"""Linear probes on frozen features (DESIGN.md §6): many multinomial logistic regressions at once.

A probe is the linear classifier of MAE (He et al. 2021, arXiv 2111.06377, §A.2) and REPA
(arXiv 2410.06940): features are standardised with the training images' mean and variance (a
BatchNorm without affine parameters), then a softmax regression with an L2 penalty is fitted,

    min_{W, b}  (1/n) Σᵢ −log softmax(Wᵀxᵢ + b)[yᵢ] + (λ/2)·‖W‖²_F        (b is not penalised),

which is scikit-learn's LogisticRegression(C) with C = 1 / (λ·n) (it minimises
C·Σᵢ CEᵢ + ½‖W‖²). λ is picked from a small grid by top-1 on a validation split carved (seeded) from
the training images; the probe is then refitted on all training images with that λ and scored on
the held-out test images, which take no part in fitting or selection.

Every probe of a feature store (e.g. [n_t, n_blocks, n, d]) is fitted in one pass: the leading
dimensions are flattened into a batch, the λ grid into a second batch dimension, and all of them
are optimised together by a batched L-BFGS (each problem keeps its own curvature pairs and step
size) whose loss and gradient are two ``torch.bmm`` calls, preconditioned by the features'
covariance (~25 loss evaluations instead of ~200 on CIFAR-like features). GPU when present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError

DEFAULT_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class ProbeConfig:
    """Knobs of ``linear_probe``, with defaults that run."""

    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS  # L2 grid; one value skips the validation split
    val_fraction: float = 0.2      # share of training images held out to choose λ
    seed: int = 0                  # seeds the validation split
    max_iter: int = 1000           # L-BFGS iterations (each is one loss+gradient evaluation)
    tol: float = 1e-4              # stop when max |gradient| ≤ tol (sklearn's lbfgs criterion)
    history: int = 10              # L-BFGS memory
    bn_eps: float = 1e-6           # BatchNorm eps, as MAE's probe
    max_batch_bytes: int = 2**30   # feature bytes (float32) per pass; more probes go in more passes


# ---------------------------------------------------------------------------------------------
#                                   Standardisation
# ---------------------------------------------------------------------------------------------

def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6
                ) -> tuple[torch.Tensor, ...]:
    """x ← (x − μ) / √(σ² + eps) with μ, σ² (biased) over the training images, axis −2.

    BatchNorm without affine at evaluation time; batched over any leading dimensions. A constant
    feature (σ = 0) becomes 0 everywhere and so cannot help or hurt the probe."""
    mean = train.mean(dim=-2, keepdim=True)
    inv_std = (train.var(dim=-2, unbiased=False, keepdim=True) + eps).rsqrt()
    return tuple((x - mean) * inv_std for x in (train, *others))


# ---------------------------------------------------------------------------------------------
#                         Softmax regression: loss, gradient, batched L-BFGS
# ---------------------------------------------------------------------------------------------

def _class_scores(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Scores in class-major layout, (B, G, c, n): Wᵀxᵢ + b for every probe and λ in one bmm.

    (Wᵀ)(Xᵀ) rather than X·W because BLAS streams X much faster this way when c is small."""
    B, n, d = x.shape
    G, c = theta.shape[1], theta.shape[-1]
    w_t = theta[:, :, :d].transpose(2, 3).reshape(B, G * c, d)
    return torch.bmm(w_t, x.transpose(1, 2)).view(B, G, c, n) + theta[:, :, d].unsqueeze(-1)


def logits(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Class scores xW + b for every probe and λ: x (B, n, d), theta (B, G, d+1, c) → (B, n, G, c).

    theta[..., :d, :] is W, theta[..., d, :] is b."""
    return _class_scores(x, theta).permute(0, 3, 1, 2)


def _loss_and_grad(x, y, lam, theta):
    """f = (1/n) Σᵢ CEᵢ + (λ/2)‖W‖², ∇_W f = Xᵀ(P − Y)/n + λW, ∇_b f = 1ᵀ(P − Y)/n.

    x (B, n, d); y (n,) class indices; lam (B, G); theta (B, G, d+1, c). Returns f (B, G) in
    float64 (line searches compare losses that differ in the 7th digit) and the gradient."""
    B, n, d = x.shape
    G, c = theta.shape[1], theta.shape[-1]
    log_p = _class_scores(x, theta).log_softmax(dim=2)           # (B, G, c, n)
    y_idx = y.view(1, 1, 1, n).expand(B, G, 1, n)
    ce = -log_p.gather(2, y_idx).squeeze(2)                       # (B, G, n)
    w = theta[:, :, :d]
    f = ce.double().mean(dim=-1) + 0.5 * lam * w.double().square().sum(dim=(-2, -1))
    resid = log_p.exp_().scatter_add_(2, y_idx, -torch.ones_like(y_idx, dtype=x.dtype)) / n
    g_w = torch.bmm(resid.view(B, G * c, n), x).view(B, G, c, d)  # (P − Y)ᵀX / n
    g_w = g_w.transpose(2, 3) + lam[..., None, None].to(x.dtype) * w
    g_b = resid.sum(dim=-1)                                       # (B, G, c)
    return f, torch.cat([g_w, g_b.unsqueeze(2)], dim=2)


def _two_loop(g, S, Y, rho, gamma, order, precond):
    """L-BFGS direction −H·g (Nocedal & Wright, Alg. 7.4), batched over problems (rows of g),
    with initial inverse Hessian H₀ = γ·M (M = ``precond``, identity when None).

    A pair that a problem did not accept is stored as zeros with ρ = 0 and drops out."""
    q = g.clone()
    alpha = {}
    for j in reversed(order):
        alpha[j] = rho[j] * (S[j] * q).sum(dim=1)
        q -= alpha[j].unsqueeze(1) * Y[j]
    r = gamma.unsqueeze(1) * (q if precond is None else precond(q))
    for j in order:
        beta = rho[j] * (Y[j] * r).sum(dim=1)
        r += (alpha[j] - beta).unsqueeze(1) * S[j]
    return -r


def lbfgs(fun, theta0: torch.Tensor, max_iter: int = 1000, tol: float = 1e-4,
          history: int = 10, max_ls: int = 25, precond=None) -> torch.Tensor:
    """Minimise B independent smooth convex problems at once. theta0 (B, D); fun(theta) returns
    (f (B,), grad (B, D)).

    Each problem has its own step (Armijo backtracking from 1) and curvature pairs, so an easy
    problem is not slowed by a hard one; a converged problem (max |grad| ≤ tol, or no relative
    decrease above 1e-12, or a failed line search) is frozen while the others go on.
    """
    theta = theta0.clone()
    B = theta.shape[0]
    f, g = fun(theta)
    S = theta.new_zeros((history,) + theta.shape)
    Y = theta.new_zeros((history,) + theta.shape)
    rho = theta.new_zeros(history, B)
    if precond is None:
        gamma = (1.0 / g.abs().sum(dim=1)).clamp(max=1.0)  # torch.optim.LBFGS's first step
    else:
        gamma = torch.ones_like(g[:, 0])

    order: list[int] = []
    active = g.abs().amax(dim=1) > tol
    for it in range(max_iter):
        if not bool(active.any()):
            break
        d = _two_loop(g, S, Y, rho, gamma, order, precond)
        gd = (g * d).sum(dim=1)
        uphill = gd >= 0  # cannot happen with exact curvature pairs; rounding guard
        d = torch.where(uphill.unsqueeze(1), -g, d)
        gd = torch.where(uphill, -(g * g).sum(dim=1), gd)
        step = active.to(theta.dtype)
        for _ in range(max_ls):
            theta_new = theta + step.unsqueeze(1) * d
            f_new, g_new = fun(theta_new)
            ok = (f_new <= f + 1e-4 * step.double() * gd.double()) | ~active
            if bool(ok.all()):
                break
            step = torch.where(ok, step, 0.5 * step)
        accept = active & ok
        s, y = theta_new - theta, g_new - g
        sy = (s * y).sum(dim=1)
        yy = (y * (y if precond is None else precond(y))).sum(dim=1)  # yᵀMy
        keep = accept & (sy > 1e-10 * yy)
        slot = it % history
        S[slot] = torch.where(keep.unsqueeze(1), s, 0.0)
        Y[slot] = torch.where(keep.unsqueeze(1), y, 0.0)
        rho[slot] = torch.where(keep, 1.0 / sy.clamp(min=1e-30), 0.0)
        gamma = torch.where(keep, sy / yy.clamp(min=1e-30), gamma)
        if slot in order:
            order.remove(slot)
        order.append(slot)
        decrease = (f - f_new) / torch.maximum(f.abs(), f_new.abs()).clamp(min=1.0)
        theta = torch.where(accept.unsqueeze(1), theta_new, theta)
        g = torch.where(accept.unsqueeze(1), g_new, g)
        f = torch.where(accept, f_new, f)
        active = accept & (g.abs().amax(dim=1) > tol) & (decrease > 1e-12)
    return theta


def _preconditioner(x: torch.Tensor, lam: torch.Tensor, num_classes: int, rows: int = 4096):
    """M ≈ (∇²f)⁻¹ from the data alone, for L-BFGS's initial inverse Hessian.

    The Hessian of the softmax loss is Σᵢ (diag pᵢ − pᵢpᵢᵀ) ⊗ x̃ᵢx̃ᵢᵀ / n + λI; with pᵢ ≈ 1/c
    its class-diagonal part is about β·XᵀX/n + λI, β = 1/c. So M applies (βC + λI)⁻¹ (one
    Cholesky factor per probe and λ) to the weights and 1/β to the intercepts (standardised
    columns have mean 0). C is estimated on evenly strided rows (about max(rows, 4d) of them):
    M only steers L-BFGS, so the fitted minimum does not depend on it, only the number of
    passes over the features (about 8x fewer than without on CIFAR-like features).
    Returns None (plain L-BFGS) if a factorisation fails, e.g. for λ = 0.
    """
    B, n, d = x.shape
    G, c = lam.shape[1], num_classes
    beta = 1.0 / c
    xs = x[:, ::max(1, n // max(rows, 4 * d))]
    cov = torch.bmm(xs.transpose(1, 2), xs) / xs.shape[1]                # (B, d, d)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    A = beta * cov.unsqueeze(1) + lam.to(x.dtype)[..., None, None] * eye  # (B, G, d, d)
    chol, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        return None

    def precond(q):
        q = q.view(B, G, d + 1, c)
        w = torch.cholesky_solve(q[:, :, :d], chol)                      # (B, G, d, c)
        return torch.cat([w, q[:, :, d:] / beta], dim=2).reshape(B * G, -1)

    return precond


def fit_logistic(x: torch.Tensor, y: torch.Tensor, lambdas: torch.Tensor, num_classes: int,
                 max_iter: int = 1000, tol: float = 1e-4, history: int = 10,
                 init: torch.Tensor | None = None, max_precond_dim: int = 4096) -> torch.Tensor:
    """Fit B·G softmax regressions: features x (B, n, d) (standardised), labels y (n,) in
    [0, num_classes), L2 weights lambdas (B, G). Returns theta (B, G, d+1, num_classes).

    L-BFGS is preconditioned with the feature covariance when d ≤ min(n, max_precond_dim) (a
    d x d eigendecomposition per probe); wider features (raw pixels, or more dimensions than
    images) use the plain scaled identity."""
    B, n, d = x.shape
    G = lambdas.shape[1]
    lam = lambdas.to(device=x.device, dtype=torch.float64)
    shape = (B, G, d + 1, num_classes)
    theta0 = x.new_zeros(shape) if init is None else init.to(x)
    precond = _preconditioner(x, lam, num_classes) if d <= min(n, max_precond_dim) else None

    def fun(flat):
        f, g = _loss_and_grad(x, y, lam, flat.view(shape))
        return f.reshape(B * G), g.reshape(B * G, -1)

    return lbfgs(fun, theta0.reshape(B * G, -1), max_iter, tol, history,
                 precond=precond).view(shape)


def _topk_correct(scores: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of images whose label is among the k best scores: scores (..., n, c), y (n,)."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    return (top == y.unsqueeze(-1)).any(dim=-1).double().mean(dim=-1)


# ---------------------------------------------------------------------------------------------
#                                   The probe
# ---------------------------------------------------------------------------------------------

def _labels(train_labels, test_labels) -> tuple[np.ndarray, np.ndarray, int]:
    """Map labels to 0..c−1 by the training set's classes; a test label never seen in training
    becomes −1 and counts as wrong."""
    train_labels = np.asarray(train_labels).ravel()
    test_labels = np.asarray(test_labels).ravel()
    classes = np.unique(train_labels)
    if len(classes) < 2:
        raise UserError(f"a linear probe needs at least 2 classes in the training labels, got "
                        f"{len(classes)}")
    pos = np.searchsorted(classes, test_labels).clip(max=len(classes) - 1)
    y_test = np.where(classes[pos] == test_labels, pos, -1)
    return np.searchsorted(classes, train_labels), y_test, len(classes)


def _check_inputs(train, train_labels, test, test_labels) -> None:
    if train.ndim < 2 or test.ndim < 2:
        raise UserError(f"features must have shape (..., images, dims); got train "
                        f"{tuple(train.shape)}, test {tuple(test.shape)}")
    if tuple(train.shape[:-2]) != tuple(test.shape[:-2]) or train.shape[-1] != test.shape[-1]:
        raise UserError(f"train features {tuple(train.shape)} and test features "
                        f"{tuple(test.shape)} must agree on every dimension but the images")
    for feats, labels, name in ((train, train_labels, "train"), (test, test_labels, "test")):
        if len(labels) != feats.shape[-2]:
            raise UserError(f"{len(labels)} {name} labels for {feats.shape[-2]} {name} images")


def _as_batch(x, p0: int, p1: int, device) -> torch.Tensor:
    """Probes p0..p1 of a (P, n, d) array/memmap/tensor as float32 on ``device``."""
    chunk = x[p0:p1]
    if not isinstance(chunk, torch.Tensor):
        # reads the memmap slice; copies so that torch can own a writable float32 array
        chunk = torch.from_numpy(np.array(chunk, dtype=np.float32))
    return chunk.to(device=device, dtype=torch.float32)


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise UserError(f"val_fraction={val_fraction} leaves no training images out of {n}")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _probe_torch(x_tr, y_tr, x_te, y_te, c, cfg: ProbeConfig, fit_idx, val_idx):
    """Search λ (if more than one) and refit, for a batch of probes. Returns per-probe arrays."""
    B = x_tr.shape[0]
    grid = torch.tensor(cfg.lambdas, dtype=torch.float64, device=x_tr.device)
    fit = dict(num_classes=c, max_iter=cfg.max_iter, tol=cfg.tol, history=cfg.history)
    if len(cfg.lambdas) > 1:
        theta = fit_logistic(x_tr[:, fit_idx], y_tr[fit_idx], grid.expand(B, -1), **fit)
        val_acc = _topk_correct(logits(x_tr[:, val_idx], theta).transpose(1, 2), y_tr[val_idx], 1)
        # val_acc (B, G); ties go to the largest λ (the simpler model): argmax returns the first
        # maximum, so search the grid from its end
        best = len(cfg.lambdas) - 1 - val_acc.flip(1).argmax(dim=1)
        init = theta[torch.arange(B), best].unsqueeze(1)
        val_top1 = val_acc[torch.arange(B), best]
    else:
        best = torch.zeros(B, dtype=torch.long, device=x_tr.device)
        init, val_top1 = None, torch.full((B,), math.nan, dtype=torch.float64)
    lam = grid[best].unsqueeze(1)
    theta = fit_logistic(x_tr, y_tr, lam, init=init, **fit)
    test_scores = logits(x_te, theta)[:, :, 0]
    out = {"top1": _topk_correct(test_scores, y_te, 1)}
    if c > 10:
        out["top5"] = _topk_correct(test_scores, y_te, 5)
    out["train_top1"] = _topk_correct(logits(x_tr, theta)[:, :, 0], y_tr, 1)
    out["val_top1"] = val_top1
    out["lambda"] = lam[:, 0]
    return {k: v.cpu().numpy() for k, v in out.items()}


def _probe_sklearn(x_tr, y_tr, x_te, y_te, c, cfg: ProbeConfig, fit_idx, val_idx):
    """The same protocol with sklearn's lbfgs LogisticRegression, C = 1/(λ·n_fit), one probe at
    a time (for cross-checking; slow)."""
    from sklearn.linear_model import LogisticRegression

    def fit(x, y, lam):
        clf = LogisticRegression(C=1.0 / (lam * len(y)), max_iter=cfg.max_iter, tol=cfg.tol)
        return clf.fit(x, y)

    def top_k(clf, x, y, k):
        # clf.classes_ ⊆ 0..c−1 in order; a test label −1 never matches
        scores = torch.from_numpy(clf.decision_function(x).reshape(len(x), -1))
        cls = torch.from_numpy(clf.classes_)
        top = cls[scores.topk(min(k, scores.shape[1]), dim=1).indices]
        return float((top == torch.from_numpy(y).unsqueeze(1)).any(dim=1).double().mean())

    rows = []
    for p in range(x_tr.shape[0]):
        xt, xe = x_tr[p].double().cpu().numpy(), x_te[p].double().cpu().numpy()
        yt, ye = y_tr.cpu().numpy(), y_te.cpu().numpy()
        row = {"val_top1": math.nan, "lambda": cfg.lambdas[0]}
        if len(cfg.lambdas) > 1:
            accs = [top_k(fit(xt[fit_idx], yt[fit_idx], lam), xt[val_idx], yt[val_idx], 1)
                    for lam in cfg.lambdas]
            best = len(accs) - 1 - int(np.argmax(accs[::-1]))
            row = {"val_top1": accs[best], "lambda": cfg.lambdas[best]}
        clf = fit(xt, yt, row["lambda"])
        row["top1"] = top_k(clf, xe, ye, 1)
        if c > 10:
            row["top5"] = top_k(clf, xe, ye, 5)
        row["train_top1"] = top_k(clf, xt, yt, 1)
        rows.append(row)
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def linear_probe(train_feats, train_labels, test_feats, test_labels,
                 config: ProbeConfig | None = None, device: torch.device | str | None = None,
                 backend: str = "torch") -> dict[str, np.ndarray]:
    """Top-1 (and top-5 with more than 10 classes) of a linear probe for every feature matrix.

    train_feats (..., n_train, d) and test_feats (..., n_test, d): numpy arrays, float16 memmaps
    or tensors with the same leading dimensions (e.g. [n_t, n_blocks]); labels (n_train,),
    (n_test,) shared by all probes. Any width d works (raw pixels, an untrained model, an encoder).
    Returns {"top1", ["top5"], "train_top1", "val_top1", "lambda"}: arrays of shape [...] (the
    leading dimensions); val_top1 is the selection accuracy (nan with a single λ).
    backend="sklearn" runs the same protocol with scikit-learn, for cross-checking.
    """
    cfg = config or ProbeConfig()
    _check_inputs(train_feats, train_labels, test_feats, test_labels)
    if backend not in ("torch", "sklearn"):
        raise UserError(f"unknown probe backend {backend!r}; choose 'torch' or 'sklearn'")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    y_tr, y_te, c = _labels(train_labels, test_labels)
    lead = tuple(train_feats.shape[:-2])
    n_tr, d = train_feats.shape[-2:]
    n_te = test_feats.shape[-2]
    x_tr_all = train_feats.reshape(-1, n_tr, d)
    x_te_all = test_feats.reshape(-1, n_te, d)
    n_probes = x_tr_all.shape[0]
    fit_idx, val_idx = _split(n_tr, cfg.val_fraction, cfg.seed)
    y_tr = torch.from_numpy(y_tr).to(device)
    y_te = torch.from_numpy(y_te).to(device)
    fit_idx_t, val_idx_t = (torch.from_numpy(i).to(device) for i in (fit_idx, val_idx))
    run = _probe_torch if backend == "torch" else _probe_sklearn
    per_pass = max(1, cfg.max_batch_bytes // (4 * (n_tr + n_te) * d))
    parts = []
    for p0 in range(0, n_probes, per_pass):
        p1 = min(p0 + per_pass, n_probes)
        x_tr = _as_batch(x_tr_all, p0, p1, device)
        x_te = _as_batch(x_te_all, p0, p1, device)
        if not (bool(torch.isfinite(x_tr).all()) and bool(torch.isfinite(x_te).all())):
            raise UserError(f"probe features {p0}..{p1 - 1} contain NaN or inf values")
        x_tr, x_te = standardize(x_tr, x_te, eps=cfg.bn_eps)
        idx = (fit_idx_t, val_idx_t) if backend == "torch" else (fit_idx, val_idx)
        parts.append(run(x_tr, y_tr, x_te, y_te, c, cfg, *idx))
    return {k: np.concatenate([p[k] for p in parts]).reshape(lead) for k in parts[0]}
