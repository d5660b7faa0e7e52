"""Multinomial logistic-regression probes in plain torch (no sklearn dependency).

A probe answers "is the label linearly decodable from these frozen features?", so it must
neither underfit (too strong a penalty hides information that is there) nor overfit
(flattened token features have far more dimensions than there are training scenes). So:
standardise with train statistics, pick the L2 strength on a held-out part of the training
scenes, refit on all of them, and score disjoint test scenes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Up to 100: with flattened token features (D >> N) the best probe is often strongly shrunk.
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant columns become 0, not inf
    return (train - mean) / std, (test - mean) / std


def row_space(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express D > N features in an orthonormal basis of the training rows (N dims).

    Exact for an L2-penalised linear model: the optimal weights lie in the span of the
    training rows (representer theorem), and the norm of weights in an orthonormal basis is
    unchanged, so the fit and its test logits are the same, at N instead of D columns
    (a 12288-pixel probe costs what a 1800-dim one does)."""
    train, test = train.double(), test.double()
    # float64: centring leaves the Gram matrix one rank short, and a float32 "zero"
    # eigenvalue would pass any threshold and blow its direction up by 1/sqrt(eps).
    evals, evecs = torch.linalg.eigh(train @ train.T)
    keep = evals > evals.max() * 1e-9
    basis = (train.T @ evecs[:, keep]) / evals[keep].sqrt()  # [D, r], orthonormal columns
    return (train @ basis).float(), (test @ basis).float()


def fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 100,
        init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS on mean cross-entropy + l2/2 * |W|^2 (bias unpenalised). `init`:
    a warm start (the previous, stronger penalty's solution on a regularisation path)."""
    if init is None:
        w, b = torch.zeros(x.shape[1], num_classes), torch.zeros(num_classes)
    else:
        w, b = (t.clone() for t in init)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=10,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-5, tolerance_change=1e-9)
    rows = torch.arange(len(y))

    @torch.no_grad()
    def closure():
        # The gradient in closed form (softmax - one-hot): a probe's matrices are small, so an
        # autograd graph per line-search evaluation would cost more than the arithmetic.
        logits = x @ w + b
        loss = F.cross_entropy(logits, y) + 0.5 * l2 * w.pow(2).sum()
        residual = logits.softmax(1)
        residual[rows, y] -= 1.0
        residual /= len(y)
        w.grad = x.T @ residual + l2 * w
        b.grad = residual.sum(0)
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def accuracy(x: torch.Tensor, y: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> float:
    w, b = wb
    return float(((x @ w + b).argmax(1) == y).float().mean())


def prepare(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised (and, for D > N, row-space) features: done once per feature set, shared
    by the probes of every attribute."""
    x_train, x_test = standardize(x_train.float(), x_test.float())
    if x_train.shape[1] > x_train.shape[0]:
        x_train, x_test = row_space(x_train, x_test)
    return x_train, x_test


def probe_prepared(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                   y_test: torch.Tensor, num_classes: int, holdout: float = 0.2,
                   l2_grid: tuple[float, ...] = L2_GRID) -> dict:
    """Test accuracy of the best-regularised probe on `prepare`d features: {'accuracy', 'l2'}."""
    n_fit = int(len(x_train) * (1 - holdout))
    best_acc, best_l2, best_wb, wb = -1.0, max(l2_grid), None, None
    # Strongest penalty first, each fit warm-started from the last (a regularisation path:
    # a few L-BFGS steps each); on a tie the more regular probe wins.
    for l2 in sorted(l2_grid, reverse=True):
        wb = fit(x_train[:n_fit], y_train[:n_fit], num_classes, l2, max_iter=50, init=wb)
        acc = accuracy(x_train[n_fit:], y_train[n_fit:], wb)
        if acc > best_acc:
            best_acc, best_l2, best_wb = acc, l2, wb
    wb = fit(x_train, y_train, num_classes, best_l2, init=best_wb)
    return {"accuracy": accuracy(x_test, y_test, wb), "l2": best_l2}


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                   y_test: torch.Tensor, num_classes: int, l2_grid: tuple[float, ...] = L2_GRID) -> dict:
    """Test accuracy of a linear probe on raw features: {'accuracy', 'l2', 'dim'}."""
    prepared = prepare(x_train, x_test)
    return {**probe_prepared(prepared[0], y_train, prepared[1], y_test, num_classes, l2_grid=l2_grid),
            "dim": x_train.shape[1]}
