"""Linear probes on frozen features (docs/probe.md): many multinomial logistic regressions at once.

A probe is the linear classifier of MAE (He et al. 2021, arXiv 2111.06377, §A.2) and REPA
(arXiv 2410.06940): features are standardised with the training images' mean and variance (a
BatchNorm without affine parameters), then a softmax regression with an L2 penalty is fitted,

    min_{W, b}  (1/n) Σᵢ −log softmax(Wᵀxᵢ + b)[yᵢ] + (λ/2)·‖W‖²_F        (b is not penalised),

which is scikit-learn's LogisticRegression(C) with C = 1 / (λ·n) (it minimises
C·Σᵢ CEᵢ + ½‖W‖²). λ is picked from a small grid by top-1 on a validation split carved (seeded) from
the training images (near-ties go to the larger λ: ``choose_lambda``); the probe is then refitted on all
training images with that λ and scored on the held-out test images, which take no part in fitting or
selection.

Every probe of a feature store (e.g. [n_t, n_blocks, n, d]) is fitted in one pass: the leading
dimensions are flattened into a batch, the λ grid into a second batch dimension, and all of them
are optimised together by a batched L-BFGS (each problem keeps its own curvature pairs and
converges on its own) preconditioned by the features' covariance. Class scores are linear in the
weights, so an iteration makes exactly two passes over the features (the scores of the new
direction, the gradient at the new point) and the step is searched exactly, per class and with
the intercepts free, from scores alone: on 10,000 CIFAR-like 768-dim features that takes ~17
iterations where scikit-learn's lbfgs takes ~180. GPU when present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError
from .metrics import exact_float32, gather_ranks
from .runtime import rank, world_size

DEFAULT_LAMBDAS = tuple(10.0 ** (k / 3) for k in range(-12, 1))   # 1e-4 … 1, three per decade (docs/probe.md)
VAL_TIE = 0.005   # validation top-1 within this share of the validation images (at least one) is a tie


@dataclass
class ProbeConfig:
    """Knobs of ``linear_probe``, with defaults that run."""

    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS  # L2 grid; one value skips the validation split
    val_fraction: float = 0.2      # share of training images held out to choose λ
    seed: int = 0                  # seeds the validation split
    max_iter: int = 1000           # L-BFGS iterations (each is two passes over the features)
    tol: float = 1e-4              # stop when max |gradient| ≤ tol (sklearn's lbfgs criterion)
    history: int = 10              # L-BFGS memory
    bn_eps: float = 1e-6           # BatchNorm eps, as MAE's probe
    max_batch_bytes: int = 2**30   # working memory per pass (features + scores); more probes, more passes


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


def _loss_and_grad(x, y, lam, theta, scores, omega=None):
    """f = (1/n) Σᵢ CEᵢ + (λ/2)‖W‖², ∇_W f = Xᵀ(P − Y)/n + λW, ∇_b f = 1ᵀ(P − Y)/n at theta,
    whose class scores (B, G, c, n) are ``scores``; one pass over the features (for ∇_W).

    x (B, n, d); y (n,) class indices; lam (B, G); theta (B, G, d+1, c); omega (B or 1, G, n) image
    weights summing to 1 per problem, in place of 1/n (None: 1/n). Returns f (B, G) in float64 (steps
    compare losses that differ in the 7th digit) and the gradient."""
    B, n, d = x.shape
    G, c = theta.shape[1], theta.shape[-1]
    log_p = scores.log_softmax(dim=2)                             # (B, G, c, n)
    y_idx = y.view(1, 1, 1, n).expand(B, G, 1, n)
    ce = -log_p.gather(2, y_idx).squeeze(2)                       # (B, G, n)
    w = theta[:, :, :d]
    mean_ce = ce.double().mean(dim=-1) if omega is None else (ce.double() * omega).sum(dim=-1)
    f = mean_ce + 0.5 * lam * w.double().square().sum(dim=(-2, -1))
    resid = log_p.exp_().scatter_add_(2, y_idx, -torch.ones_like(y_idx, dtype=x.dtype))
    resid = resid / n if omega is None else resid * omega.unsqueeze(2)
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


SPLIT_MAX_CLASSES = 32  # up to this many classes the step is searched per class, with intercepts


def _step_search(scores, z, y, lam, theta, direction, active, max_newton: int = 10, omega=None):
    """Minimise f(θ + α∘Δ + δ) over per-class multipliers α ∈ Rᶜ of the L-BFGS direction Δ and
    intercept shifts δ ∈ Rᶜ, without another pass over the features.

    Class scores are linear in θ, so those of θ + α∘Δ + δ are S + α∘Z + δ, with Z = ``z`` the
    scores of Δ (one pass, already made): each trial costs O(n·c). Newton's method on the 2c
    numbers (gradient and Hessian of the softmax loss restricted to that subspace, with halving
    when a step does not decrease f) starts from α = δ = 0 and stops once a step promises less
    than 1% of the decrease found so far, usually after 2–3 steps. Scaling each class's part of
    the step separately and re-centring the intercepts exactly makes up for what the data-only
    preconditioner gets wrong once the probabilities move away from 1/c: 17 iterations instead
    of 29 with unit steps on the CIFAR probe benchmark. Above SPLIT_MAX_CLASSES
    classes (a 2c x 2c system per problem would cost too much) it is an exact line search, one α.
    Each Newton step computes only the problems still searching. omega: image weights as in
    ``_loss_and_grad``. Returns α, δ (B, G, c), zero for inactive problems.
    """
    B, G, c, n = scores.shape
    P, d, split, f64 = B * G, theta.shape[2] - 1, c <= SPLIT_MAX_CLASSES, torch.float64
    w, dw = theta[:, :, :d].double(), direction[:, :, :d].double()
    w_dot, d_sq = (w * dw).sum(dim=2).view(P, c), (dw * dw).sum(dim=2).view(P, c)
    reg0 = (0.5 * lam * w.square().sum(dim=(2, 3))).view(P)
    lam1 = lam.reshape(P, 1).to(f64)
    scores, z = scores.reshape(P, c, n), z.reshape(P, c, n)
    if omega is not None:
        omega = omega.expand(B, G, n).reshape(P, 1, n)
    alpha = torch.zeros(P, c, dtype=f64, device=scores.device)
    delta, best_a, best_d = torch.zeros_like(alpha), torch.zeros_like(alpha), torch.zeros_like(alpha)
    best_phi, phi0 = torch.zeros(P, dtype=f64, device=scores.device), None
    todo = active.reshape(P).nonzero().squeeze(1)   # the problems still searching; each on its own,
    for _ in range(max_newton):                     # so a batch gives what one alone gives
        if todo.numel() == 0:
            break
        s_k, z_k, lam_k, a, dl = scores[todo], z[todo], lam1[todo], alpha[todo], delta[todo]
        om = None if omega is None else omega[todo]

        def avg(v):   # the mean over images of v (k, ·, n), weighted by omega if given, in float64
            return v.sum(-1, dtype=f64) / n if om is None else (v * om).sum(-1, dtype=f64)

        y_idx = y.view(1, 1, n).expand(todo.numel(), 1, n)
        log_p = (s_k + a.to(s_k.dtype).unsqueeze(-1) * z_k + dl.to(s_k.dtype).unsqueeze(-1)).log_softmax(dim=1)
        phi = avg(-log_p.gather(1, y_idx))[:, 0] + reg0[todo] + \
            (lam_k * (a * w_dot[todo] + 0.5 * a.square() * d_sq[todo])).sum(dim=-1)
        if phi0 is None:
            phi0 = best_phi.index_copy(0, todo, phi)
            best_phi = phi0.clone()
        better = phi <= best_phi[todo]
        b2 = better.unsqueeze(-1)
        ba, bd = torch.where(b2, a, best_a[todo]), torch.where(b2, dl, best_d[todo])
        bphi = torch.where(better, phi, best_phi[todo])
        best_a[todo], best_d[todo], best_phi[todo] = ba, bd, bphi
        grad, newton = _newton(log_p.exp(), y_idx, z_k, avg, lam_k, w_dot[todo], d_sq[todo], a, om, split)
        new_a, new_d = (a - newton[:, :c], dl - newton[:, c:]) if split else (a - newton, dl)
        # done when Newton promises < 1% of what this search has gained (or nothing at all)
        decrement = (grad * newton).sum(-1)
        done = better & (decrement <= torch.maximum(1e-2 * (phi0[todo] - bphi), 1e-10 * bphi.abs().clamp(min=1.0)))
        # a point that did not decrease f is halved back towards the best one
        alpha[todo] = torch.where(b2, new_a, 0.5 * (a + ba))
        delta[todo] = torch.where(b2, new_d, 0.5 * (dl + bd))
        todo = todo[~done]
    return best_a.view(B, G, c), best_d.view(B, G, c)


def _newton(p, y_idx, z_k, avg, lam_k, w_dot, d_sq, a, om, split: bool):
    """_step_search's Newton step from the probabilities p (k, c, n) at the current point: (gradient, step) over
    (α, δ), 2c numbers per problem (split), or over one shared α (an exact line search)."""
    n, c = p.shape[-1], p.shape[1]
    q = p.clone().scatter_add_(1, y_idx, -torch.ones_like(y_idx, dtype=p.dtype))   # P − Y
    pz = p * z_k
    g_a = avg(q * z_k) + lam_k * (w_dot + a * d_sq)
    h_aa = avg(pz * z_k) + lam_k * d_sq        # diagonal parts
    if not split:
        grad = g_a.sum(-1, keepdim=True)
        hess = h_aa.sum(-1) - avg(pz.sum(dim=1, keepdim=True).double().square())[:, 0]
        return grad, grad / hess.clamp(min=1e-30).unsqueeze(-1)
    g_d = avg(q)
    m = torch.cat([pz, p], dim=1)
    hess = -torch.bmm(m / n if om is None else m * om, m.transpose(1, 2)).double()
    diag = torch.cat([h_aa, avg(p)], dim=-1)
    hess += torch.diag_embed(diag)
    cross = torch.diag_embed(avg(pz))      # ∂²/∂αₐ∂δₐ
    hess[:, :c, c:] += cross
    hess[:, c:, :c] += cross
    grad = torch.cat([g_a, g_d], dim=-1)
    # adding one constant to every intercept changes nothing: a tiny ridge fixes it
    ridge = 1e-9 * diag.amax(dim=-1, keepdim=True).clamp(min=1e-30)
    return grad, torch.linalg.solve(hess + torch.diag_embed(ridge.expand_as(diag)), grad)


def _preconditioner(x: torch.Tensor, lam: torch.Tensor, num_classes: int, rows: int = 4096):
    """M ≈ (∇²f)⁻¹ from the data alone, for L-BFGS's initial inverse Hessian, as an eigenbasis V
    (B, d, d) of the features and M's diagonal there, (B·G, (d+1)·c).

    The Hessian of the softmax loss is Σᵢ (diag pᵢ − pᵢpᵢᵀ) ⊗ x̃ᵢx̃ᵢᵀ / n + λI; with pᵢ ≈ 1/c
    its class-diagonal part is about β·XᵀX/n + λI, β = 1/c. So M applies (βC + λI)⁻¹ to the
    weights and 1/β to the intercepts (standardised columns have mean 0). C is estimated on evenly
    strided rows (about max(rows, 4d) of them): M only steers L-BFGS, so the fitted minimum does
    not depend on it, only the number of passes over the features (about 8x fewer than without on
    CIFAR-like features). With C = VΛVᵀ, M is diagonal in the basis V, 1/(βΛ + λ): fit_logistic
    fits there (features XV), so applying M costs nothing and one eigendecomposition per probe
    serves every λ. Returns (None, None) (plain L-BFGS) if some βΛ + λ is not positive, e.g. for
    λ = 0 and a constant feature.
    """
    B, n, d = x.shape
    G, c = lam.shape[1], num_classes
    beta = 1.0 / c
    xs = x[:, ::max(1, n // max(rows, 4 * d))]
    evals, vecs = torch.linalg.eigh(torch.bmm(xs.transpose(1, 2), xs) / xs.shape[1])   # (B, d), (B, d, d)
    denom = beta * evals.double().clamp(min=0).unsqueeze(1) + lam.unsqueeze(-1)         # (B, G, d)
    if not bool((denom > 0).all()):
        return None, None
    diag = torch.cat([1.0 / denom, denom.new_full((B, G, 1), 1.0 / beta)], dim=2)       # (B, G, d+1)
    return vecs, diag.to(x.dtype).unsqueeze(-1).expand(B, G, d + 1, c).reshape(B * G, -1)


def _row_basis(x: torch.Tensor) -> torch.Tensor:
    """Q (B, d, n) with orthonormal columns spanning each problem's n training rows x (B, n, d), d > n.

    The scores see only W's part in that span (XW = XQQᵀW) and ‖W‖² = ‖QᵀW‖² + ‖(I − QQᵀ)W‖², so
    the penalised minimum is W = QW' where W' solves the same regression on the features XQ
    (B, n, n): an exact change of variables. Its point is conditioning: the d > n problem has no
    usable covariance preconditioner, and plain float32 L-BFGS on such (anisotropic) features stalls
    far from the minimum; in the basis the covariance is n × n and the preconditioner applies."""
    return torch.linalg.qr(x.transpose(1, 2)).Q


def _change_basis(theta: torch.Tensor, basis: torch.Tensor, equation: str) -> torch.Tensor:
    """Weights (B, G, ·+1, c) into (_INTO) or out of (_OUT) an orthonormal basis (B, d, r); intercepts unchanged."""
    return torch.cat([torch.einsum(equation, basis, theta[:, :, :-1]), theta[:, :, -1:]], dim=2)


_INTO, _OUT = "bdr,bgdc->bgrc", "bdr,bgrc->bgdc"   # weights into / out of a basis (B, d, r)


@exact_float32()
def fit_logistic(x: torch.Tensor, y: torch.Tensor, lambdas: torch.Tensor, num_classes: int,
                 max_iter: int = 1000, tol: float = 1e-4, history: int = 10,
                 init: torch.Tensor | None = None, max_precond_dim: int = 4096,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Fit B·G softmax regressions: features x (B, n, d) (standardised), labels y (n,) in
    [0, num_classes), L2 weights lambdas (B, G). Returns theta (B, G, d+1, num_classes).

    weights (B or 1, G, n), ≥ 0: each problem's image weights, the loss becoming Σᵢ wᵢ·CEᵢ / Σᵢ wᵢ. With
    bootstrap draw counts that is exactly the fit on the resampled rows (an image drawn twice counts twice),
    on the features as given, without copying them: every problem of a probe shares x.

    Batched L-BFGS: every problem keeps its own curvature pairs and converges on its own
    (max |gradient| ≤ tol, sklearn's lbfgs criterion, but taken in the basis of the fit (below),
    where on anisotropic features it is the stricter test; or no relative decrease above 1e-12),
    and is frozen while the others go on. An iteration makes two passes
    over the features: the scores of the new direction (then ``_step_search`` finds the step from
    them alone) and the gradient at the new point. Scores are carried forward (S ← S + α∘Z + δ),
    so at the end they are recomputed from theta and convergence is checked once more on the
    exact values. The fit runs in an orthonormal basis of the weights, an exact change of
    variables (the L2 penalty and the scores are the same in it): for more dimensions than images
    (d > n) the span of the n training rows (``_row_basis``), and, up to max_precond_dim
    dimensions, the eigenbasis of the feature covariance, where the covariance preconditioner
    (``_preconditioner``) is diagonal. Wider features use plain L-BFGS."""
    B, n, d = x.shape
    G, c = lambdas.shape[1], num_classes
    lam = lambdas.to(device=x.device, dtype=torch.float64)
    basis = _row_basis(x) if d > n else None
    xb = x if basis is None else torch.bmm(x, basis)
    scale = None
    if xb.shape[-1] <= max_precond_dim:
        vecs, scale = _preconditioner(xb, lam, c)
        if vecs is not None:
            basis = vecs if basis is None else torch.bmm(basis, vecs)
            xb = torch.bmm(xb, vecs)
    if basis is not None and init is not None:
        init = _change_basis(init.to(x).expand(B, G, d + 1, c), basis, _INTO)
    omega = None if weights is None else (weights / weights.sum(dim=-1, keepdim=True)).to(x)
    theta = _lbfgs(xb, y, lam, c, max_iter, tol, history, init, scale, omega)
    return theta if basis is None else _change_basis(theta, basis, _OUT)


def _lbfgs(x, y, lam, c, max_iter, tol, history, init, scale, omega):
    """fit_logistic's loop, on features x (B, n, r) in the basis of the fit, preconditioned by the
    diagonal ``scale`` (B·G, (r+1)·c) (None: a scaled identity), with image weights omega (None: 1/n)."""
    B, n, d = x.shape
    G = lam.shape[1]
    precond = None if scale is None else scale.mul
    shape = (B, G, d + 1, c)
    theta = x.new_zeros(shape) if init is None else init.to(x).expand(shape).clone()
    scores = _class_scores(x, theta) if init is not None else x.new_zeros(B, G, c, n)
    f, g = _loss_and_grad(x, y, lam, theta, scores, omega)
    flat = (B * G, -1)
    S = x.new_zeros((history, B * G, (d + 1) * c))
    Y = torch.zeros_like(S)
    rho = x.new_zeros(history, B * G)
    gamma = x.new_ones(B * G) if precond is not None else \
        (1.0 / g.reshape(flat).abs().sum(dim=1)).clamp(max=1.0)   # torch.optim.LBFGS's first step
    order: list[int] = []
    stalled = torch.zeros(B, G, dtype=torch.bool, device=x.device)
    active = g.abs().amax(dim=(2, 3)) > tol
    exact = True
    for it in range(max_iter):
        if not bool(active.any()):
            if exact:
                break
            scores = _class_scores(x, theta)           # drop the drift of S ← S + α∘Z + δ
            f, g = _loss_and_grad(x, y, lam, theta, scores, omega)
            active = ~stalled & (g.abs().amax(dim=(2, 3)) > tol)
            exact = True
            continue
        direction = _two_loop(g.reshape(flat), S, Y, rho, gamma, order, precond).view(shape)
        direction = torch.where(active[..., None, None], direction, 0.0)
        z = _class_scores(x, direction)
        alpha, delta = _step_search(scores, z, y, lam, theta, direction, active, omega=omega)
        step = direction * alpha.to(x.dtype).unsqueeze(2)
        step[:, :, d] += delta.to(x.dtype)
        theta = theta + step
        scores = scores + alpha.to(x.dtype).unsqueeze(-1) * z + delta.to(x.dtype).unsqueeze(-1)
        exact = False
        f_new, g_new = _loss_and_grad(x, y, lam, theta, scores, omega)
        s, yv = step.reshape(flat), (g_new - g).reshape(flat)
        sy = (s * yv).sum(dim=1)
        yy = (yv * (yv if precond is None else precond(yv))).sum(dim=1)  # yᵀMy
        keep = active.reshape(-1) & (sy > 1e-10 * yy)
        slot = it % history
        S[slot] = torch.where(keep.unsqueeze(1), s, 0.0)
        Y[slot] = torch.where(keep.unsqueeze(1), yv, 0.0)
        rho[slot] = torch.where(keep, 1.0 / sy.clamp(min=1e-30), 0.0)
        gamma = torch.where(keep, sy / yy.clamp(min=1e-30), gamma)
        if slot in order:
            order.remove(slot)
        order.append(slot)
        decrease = (f - f_new) / torch.maximum(f.abs(), f_new.abs()).clamp(min=1.0)
        stalled |= active & (decrease <= 1e-12)
        f, g = f_new, g_new
        active = ~stalled & (g.abs().amax(dim=(2, 3)) > tol)
    return theta


def _topk_hits(scores: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each image's label is among its k best scores: scores (..., n, c), y (n,) → (..., n) bool."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    return (top == y.unsqueeze(-1)).any(dim=-1)


def _topk_correct(scores: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of images whose label is among the k best scores: scores (..., n, c), y (n,)."""
    return _topk_hits(scores, y, k).double().mean(dim=-1)


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


def choose_lambda(val_top1: np.ndarray, lambdas: tuple[float, ...], n_val: int | np.ndarray) -> np.ndarray:
    """Index into `lambdas` of the λ chosen from validation top-1 (..., G): the largest λ (the simplest model)
    whose accuracy is within max(1, ⌊VAL_TIE·n_val⌋) validation images of the best (n_val: a number, or one
    per row broadcasting against (..., 1), e.g. the validation images a bootstrap replicate drew).

    Accuracies that close are tied: the same probe fitted in another batch, on other threads or another CPU
    stops L-BFGS (|gradient| ≤ tol) at a slightly different point, and at the smallest λ (flat objective)
    that flips a validation image or two (docs/probe.md). Exact ties and near ones go the same way, and the
    λ that wins on one machine wins on another unless an accuracy sits right at the tie's edge."""
    correct = np.rint(np.asarray(val_top1, dtype=np.float64) * n_val)
    tied = correct >= correct.max(axis=-1, keepdims=True) - np.maximum(1, np.floor(VAL_TIE * np.asarray(n_val)))
    return np.argmax(np.where(tied, np.asarray(lambdas, dtype=np.float64), -np.inf), axis=-1)


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise UserError(f"val_fraction={val_fraction} leaves no training images out of {n}")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _validation_choice(hits: torch.Tensor, counts: torch.Tensor, lambdas: tuple[float, ...]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The λ each probe chooses under each draw of the validation images: hits (B, G, n_val) of the probes
    fitted on the fit split at every λ, counts (S, n_val) of the validation images in each draw (ones: every
    image once). Returns the chosen index (B, S) (``choose_lambda``) and the validation top-1 (B, S, G)."""
    counts = counts.double()
    n_val = counts.sum(dim=-1)
    acc = torch.einsum("bgn,sn->bsg", hits.double(), counts) / n_val[:, None]
    best = choose_lambda(acc.cpu().numpy(), lambdas, n_val.cpu().numpy()[:, None])
    return torch.from_numpy(best).to(hits.device), acc


@exact_float32()
def _probe_torch(x_tr, y_tr, x_te, y_te, c, cfg: ProbeConfig, fit_idx, val_idx, draws=None):
    """Search λ (if more than one) and refit, for a batch of probes; with ``draws``, bootstrap draw counts of
    the training and test images ((R, n_train), (R, n_test)), each replicate's probe too: λ chosen anew on its
    draw of the validation images, refitted on its draw of the training images and scored on its draw of the
    test images. Returns per-probe arrays."""
    B, dev = x_tr.shape[0], x_tr.device
    grid = torch.tensor(cfg.lambdas, dtype=torch.float64, device=dev)
    fit = dict(num_classes=c, max_iter=cfg.max_iter, tol=cfg.tol, history=cfg.history)
    if len(cfg.lambdas) > 1:
        theta_grid = fit_logistic(x_tr[:, fit_idx], y_tr[fit_idx], grid.expand(B, -1), **fit)
        val_hits = _topk_hits(logits(x_tr[:, val_idx], theta_grid).transpose(1, 2), y_tr[val_idx], 1)   # (B, G, n_val)

    def refit(counts=None):
        """λ chosen on the validation images weighted by `counts` (S, n_train) of the training images (None:
        every image once), then the fit on all training images weighted alike, from the fit-split solution at
        that λ: theta (B, S, d+1, c), the λ's index (B, S), validation top-1 by λ (B, S, G)."""
        weights = torch.ones(1, len(y_tr), device=dev) if counts is None else counts
        if len(cfg.lambdas) > 1:
            best, acc = _validation_choice(val_hits, weights[:, val_idx], cfg.lambdas)
            start = theta_grid[torch.arange(B, device=dev)[:, None], best]
        else:
            best, start = torch.zeros(B, len(weights), dtype=torch.long, device=dev), None
            acc = torch.full((B, len(weights), 1), math.nan, dtype=torch.float64)
        theta = fit_logistic(x_tr, y_tr, grid[best], init=start, weights=None if counts is None else counts[None],
                             **fit)
        return theta, best, acc

    theta, best, val_acc = refit()
    best, val_acc = best[:, 0], val_acc[:, 0]
    test_scores = logits(x_te, theta)[:, :, 0]
    hits = _topk_hits(test_scores, y_te, 1)
    out = {"top1": hits.double().mean(dim=-1), "hits": hits}
    if c > 10:
        out["top5"] = _topk_correct(test_scores, y_te, 5)
    out["train_top1"] = _topk_correct(logits(x_tr, theta)[:, :, 0], y_tr, 1)
    out["val_top1"], out["val_top1_by_lambda"] = val_acc[torch.arange(B), best], val_acc
    out["lambda"] = grid[best]
    if draws is not None:
        train_counts, test_counts = (torch.as_tensor(d, device=dev) for d in draws)
        scores = logits(x_te, refit(train_counts.to(x_tr))[0]).transpose(1, 2)              # (B, R, n_test, c)
        for k in (1, 5):
            if f"top{k}" in out:
                drawn = _topk_hits(scores, y_te, k).double() * test_counts.double()
                out[f"top{k}_replicates"] = drawn.sum(dim=-1) / test_counts.sum(dim=-1)   # (B, R)
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
        row = {"val_top1": math.nan, "val_top1_by_lambda": np.full(1, math.nan), "lambda": cfg.lambdas[0]}
        if len(cfg.lambdas) > 1:
            accs = np.array([top_k(fit(xt[fit_idx], yt[fit_idx], lam), xt[val_idx], yt[val_idx], 1)
                             for lam in cfg.lambdas])
            best = int(choose_lambda(accs, cfg.lambdas, len(val_idx)))
            row = {"val_top1": accs[best], "val_top1_by_lambda": accs, "lambda": cfg.lambdas[best]}
        clf = fit(xt, yt, row["lambda"])
        row["top1"] = top_k(clf, xe, ye, 1)
        row["hits"] = clf.predict(xe) == ye
        if c > 10:
            row["top5"] = top_k(clf, xe, ye, 5)
        row["train_top1"] = top_k(clf, xt, yt, 1)
        rows.append(row)
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def linear_probe(train_feats, train_labels, test_feats, test_labels,
                 config: ProbeConfig | None = None, device: torch.device | str | None = None,
                 backend: str = "torch", resample: tuple[np.ndarray, np.ndarray] | None = None,
                 split: bool = False) -> dict[str, np.ndarray]:
    """Top-1 (and top-5 with more than 10 classes) of a linear probe for every feature matrix.

    train_feats (..., n_train, d) and test_feats (..., n_test, d): numpy arrays, float16 memmaps
    or tensors with the same leading dimensions (e.g. [n_t, n_blocks]); labels (n_train,),
    (n_test,) shared by all probes. Any width d works (raw pixels, an untrained model, an encoder).
    Returns {"top1", ["top5"], "train_top1", "val_top1", "lambda"}: arrays of shape [...] (the
    leading dimensions); val_top1 is the selection accuracy (nan with a single λ), "val_top1_by_lambda"
    [..., G] that of every λ (`choose_lambda` picks from it); and "hits" [..., n_test] (bool: test image i
    classified right, top-1).
    resample: bootstrap draw counts of the training and the test images, (R, n_train) and (R, n_test)
    (``stats.draw_counts``): for each replicate, every probe's λ is chosen anew from the validation top-1 of
    the fit-split probes with the validation images weighted by their counts, the probe is refitted at it on
    the training images weighted by theirs (an image drawn twice counts twice) and scored on the test images
    weighted by theirs. Adds "top1_replicates" (and "top5_replicates") [..., R]: the spread of a probe's
    accuracy over new training and test images, fitting and the choice of λ included (docs/statistics.md).
    backend="sklearn" runs the same protocol with scikit-learn, for cross-checking (without replicates).
    split: under torchrun (a process group), every rank calls this with the same arguments, each one fits its
    share of the passes (the groups of probes fitted together, as one process forms them) and every rank
    returns all the values: exactly one process's, since each probe is fitted in the same company.
    """
    cfg = config or ProbeConfig()
    _check_inputs(train_feats, train_labels, test_feats, test_labels)
    if backend not in ("torch", "sklearn"):
        raise UserError(f"unknown probe backend {backend!r}; choose 'torch' or 'sklearn'")
    if resample is not None and (backend != "torch" or np.shape(resample[0])[1:] != (len(train_labels),) or
                                 np.shape(resample[1]) != (len(resample[0]), len(test_labels))):
        raise UserError(f"resample: draw counts (R, {len(train_labels)}) and (R, {len(test_labels)}) for the torch "
                        f"backend; got {np.shape(resample[0])} and {np.shape(resample[1])} for {backend!r}")
    return _run_probes(train_feats, train_labels, test_feats, test_labels, cfg, device, backend, resample, split)


def _run_probes(train_feats, train_labels, test_feats, test_labels, cfg: ProbeConfig, device, backend: str,
                resample, split: bool = False) -> dict[str, np.ndarray]:
    """linear_probe's work on checked inputs: the probes in passes that fit cfg.max_batch_bytes."""
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
    # per probe: its float32 features, and about ten (λ, class, image) score arrays while fitting
    # (scores, the direction's scores, softmax temporaries; with 1000 classes the scores dominate),
    # for features wider than the images their row basis (fit_logistic), and per problem fitted at once
    # (the λ grid, or the R replicates) the L-BFGS history (2·history weight vectors)
    fits = max(len(cfg.lambdas), 0 if resample is None else len(resample[0]))
    per_probe = 4 * ((n_tr + n_te) * d + 10 * fits * c * n_tr + (d > n_tr) * d * n_tr +
                     2 * cfg.history * fits * (d + 1) * c)
    per_pass = max(1, cfg.max_batch_bytes // per_probe)
    passes = [(p0, min(p0 + per_pass, n_probes)) for p0 in range(0, n_probes, per_pass)]
    ranks = world_size() if split and len(passes) >= world_size() else 1    # else every rank fits them all
    mine = passes[rank() if ranks > 1 else 0::ranks]
    parts = []
    for p0, p1 in mine:
        x_tr = _as_batch(x_tr_all, p0, p1, device)
        x_te = _as_batch(x_te_all, p0, p1, device)
        if not (bool(torch.isfinite(x_tr).all()) and bool(torch.isfinite(x_te).all())):
            raise UserError(f"probe features {p0}..{p1 - 1} contain NaN or inf values")
        x_tr, x_te = standardize(x_tr, x_te, eps=cfg.bn_eps)
        if backend == "torch":
            parts.append(_probe_torch(x_tr, y_tr, x_te, y_te, c, cfg, fit_idx_t, val_idx_t, resample))
        else:
            parts.append(_probe_sklearn(x_tr, y_tr, x_te, y_te, c, cfg, fit_idx, val_idx))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if ranks > 1:     # each rank's probes into arrays of all of them (float64 carries booleans exactly), shared
        rows = np.concatenate([np.arange(p0, p1) for p0, p1 in mine])
        full = {k: np.zeros((n_probes,) + v.shape[1:]) for k, v in out.items()}
        for k, v in out.items():
            full[k][rows] = v
        gather_ranks(list(full.values()))
        out = {k: v.astype(out[k].dtype) for k, v in full.items()}
    return {k: v.reshape(lead + v.shape[1:]) for k, v in out.items()}
