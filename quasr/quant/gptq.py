"""Layer solvers: GPTQ (with GPTAQ's in-loop asymmetric correction), QEP's target correction, layer errors.

Small pure functions over tensors; no model knowledge. Orientation throughout: a Linear computes y = W x with
W [out, in] and inputs as column vectors, so a calibration set is X [in, n] (n positions) and

    H   = Σ x̂ x̂ᵀ          = X̂ X̂ᵀ         [in, in]  (a sum over positions, not a mean)
    H_Δ = Σ (x − x̂) x̂ᵀ    = (X − X̂) X̂ᵀ   [in, in]  (row index: the input's error, column index: x̂)

where x is the layer's input in the full-precision model and x̂ its input in the partially quantized model.

References
    GPTQ   Frantar et al. 2022, arXiv 2210.17323; reference code github.com/IST-DASLab/gptq, `gptq.py`
           (`GPTQ.fasterquant`).
    GPTAQ  Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration",
           arXiv 2504.02692; reference code github.com/Intelligent-Computing-Lab-Yale/GPTAQ,
           `fake_quant/gptaq_utils.py` (`GPTAQ.fasterquant`, identical in `fake_quant/gptqv2_utils.py`).
    QEP    shared/METHODS.md, "Base: QEP".
"""
from __future__ import annotations

import time
import warnings

import torch

from quasr.quant.grid import QuantConfigError, QuantGrid, QuantizedWeight, check_finite, fit_params, quantize_codes

__all__ = ["gptq", "qep_correct", "recon_error", "asym_error", "asym_errors", "MAX_DAMP_ESCALATIONS"]

MAX_DAMP_ESCALATIONS = 3  # on a failed Cholesky, retry with 10x, 100x, 1000x the requested relative damping


# ----------------------------------------------------------------------------------------------- helpers


def _check_square(M: torch.Tensor, n: int, what: str, name: str) -> None:
    if M.dim() != 2 or tuple(M.shape) != (n, n):
        raise QuantConfigError(f"{name}: {what} must be [{n}, {n}] for a weight with {n} inputs, "
                               f"got shape {tuple(M.shape)}")
    if not torch.isfinite(M).all():
        raise QuantConfigError(f"{name}: {what} has NaN or infinite values")


def _check_weight(W: torch.Tensor, name: str) -> None:
    if W.dim() != 2:
        raise QuantConfigError(f"{name}: expected a 2-D weight [out, in], got shape {tuple(W.shape)}")
    check_finite(W, name)


def _fix_dead(H: torch.Tensor) -> torch.Tensor:
    """Boolean mask of dead inputs (H_ii == 0); sets their diagonal to 1 in place (as the reference)."""
    dead = torch.diag(H) == 0
    idx = torch.nonzero(dead).flatten()
    H[idx, idx] = 1
    return dead


def _damped_cholesky(H: torch.Tensor, percdamp: float, name: str, *, inverse_upper: bool):
    """Factor H + λI with λ = percdamp · mean(diag H), escalating λ ×10 (MAX_DAMP_ESCALATIONS times) on failure.

    H is float64 with dead inputs already fixed. Returns (factor, λ, relative damping); the factor is the lower
    Cholesky factor L of H + λI (L Lᵀ = H + λI), or with inverse_upper the upper Cholesky factor U of (H + λI)⁻¹
    (UᵀU = (H + λI)⁻¹, as the reference's cholesky → cholesky_inverse → cholesky(upper=True)), obtained with one
    Cholesky and one triangular inverse: with J the reversal permutation and J (H + λI) J = L Lᵀ,
    H + λI = (J L J)(J L J)ᵀ with J L J upper triangular, so U = (J L J)⁻¹ = J L⁻¹ J.
    Warns, naming the layer and the damping used, when the requested damping was not enough; raises
    QuantConfigError naming the layer when even the largest one fails.
    """
    if percdamp < 0:
        raise QuantConfigError(f"{name}: percdamp must be non-negative, got {percdamp}")
    mean_diag = float(torch.diag(H).mean()) if H.numel() else 1.0
    if not mean_diag > 0:
        mean_diag = 1.0  # a broken H with non-positive mean diagonal: damp relative to 1
    base = percdamp if percdamp > 0 else 1e-3
    tries = [percdamp] + [base * 10 ** k for k in range(1, MAX_DAMP_ESCALATIONS + 1)]
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for rel in tries:
        damp = rel * mean_diag
        Hd = H + damp * eye
        if inverse_upper:
            Hd = Hd.flip(0, 1)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() != 0 or not torch.isfinite(L).all():
            continue
        factor = L
        if inverse_upper:
            factor = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            if not torch.isfinite(factor).all():
                continue
        if rel != percdamp:
            warnings.warn(f"{name}: Cholesky of the Hessian failed with damping {percdamp:g}·mean(diag H); "
                          f"used damping {rel:g}·mean(diag H) = {damp:.4g}", stacklevel=3)
        return factor.contiguous(), damp, rel
    raise QuantConfigError(f"{name}: the Hessian is not positive definite even with damping "
                           f"{tries[-1]:g}·mean(diag H) (tried {', '.join(f'{t:g}' for t in tries)}); "
                           f"the calibration statistics are broken")


# ----------------------------------------------------------------------------------------------- GPTQ / GPTAQ


def gptq(W: torch.Tensor, H: torch.Tensor, grid: QuantGrid, *, name: str = "weight", blocksize: int = 128,
         percdamp: float = 0.01, act_order: bool = False, static_groups: bool = True,
         dXXT: torch.Tensor | None = None, alpha: float = 0.25,
         factor_cache: dict | None = None) -> tuple[QuantizedWeight, dict]:
    """GPTQ of one [out, in] weight under H = Σ x̂ x̂ᵀ [in, in]; given `dXXT` = H_Δ = Σ (x − x̂) x̂ᵀ, GPTAQ.

    GPTQ (reference: IST-DASLab/gptq `GPTQ.fasterquant`) minimizes ‖W X̂ − Ŵ X̂‖² column by column:
      dead inputs (H_ii = 0): H_ii = 1, W[:, i] = 0; λ = percdamp · mean(diag H) is added to the diagonal
      (escalated ×10 up to MAX_DAMP_ESCALATIONS times, with a warning, if the Cholesky fails);
      U = upper Cholesky factor of (H + λI)⁻¹; for each column i (in blocks of `blocksize`, lazy updates):
          q_i = Q(w_i),  e_i = (w_i − q_i) / U_ii,  W[:, i:] −= e_i U[i, i:]
      and after a block [i1, i2):  W[:, i2:] −= E[:, i1:i2] U[i1:i2, i2:].
    With a group size, each row's scale and zero are fitted (grid.fit_params) on the group's columns of the
    already-updated W when the sweep reaches the group's first column (the blocksize is rounded to a multiple of
    the group size so that a group never straddles blocks; the reference fits on the block-start values instead).
    `act_order` sweeps the columns by diag(H) descending; grouped, it needs `static_groups`: every group's
    parameters are then fitted up front on the (dead-zeroed) original W, group g covering original columns
    [g·gs, (g+1)·gs), so that the codes keep the plain per-group layout. Without act_order (or without groups)
    `static_groups` changes nothing. The factorization runs in float64, the sweep in float32.

    GPTAQ (asymmetric calibration, ‖W X − Ŵ X̂‖²), as `GPTAQ.fasterquant` in Intelligent-Computing-Lab-Yale/GPTAQ
    `fake_quant/gptaq_utils.py`. Its `dXXT` = Σ (x − x̂) x̂ᵀ is H_Δ in the same orientation (no transpose); columns
    of dead inputs are set to 0 and both indices permuted with act_order. Then
          P = α · triu(dXXT Uᵀ, diagonal=1) U
          in a block:   W[:, i:]  −= e_i U[i, i:] − w_i P[i, i:]              (w_i: column i before rounding)
          after it:     W[:, i2:] −= E[:, i1:i2] U[i1:i2, i2:] − W₁ P[i1:i2, i2:]
    where W₁ is the block after its sweep, i.e. its quantized values (column i ends at q_i): the reference's lazy
    update uses q where its in-block update uses w, so its result depends slightly on blocksize; reproduced as is.
    Since (H_RR)⁻¹ = U[R, R]ᵀ U[R, R] for the trailing columns R = (i, in), P[i, R] = α · H_Δ[i, R] (H_RR)⁻¹: the
    remaining columns absorb, by least squares on x̂_R, the part w_i (x_i − x̂_i) of column i's output that x̂
    misses. α = 0.25 is the reference's default (α = 1 is the derivation's full correction).

    Returns (qw, info). qw: uint8 codes in original column order and per-(row, group) scales/zeros laid out as
    grid.rtn's, so that `qw.dequantize()` is exactly the weight the sweep produced. info: "damp" (final λ,
    absolute), "percdamp" (final relative damping), "loss" (Σ_i ‖e_i‖²; for plain GPTQ this equals
    tr((W − Ŵ)(H + λI)(W − Ŵ)ᵀ) with dead columns of W zeroed), "seconds" (wall time).

    `factor_cache`: a dict shared by several solves under the same H (and percdamp, act_order), e.g. a pilot
    solve and the final one: the damped factor U is computed by the first and reused by the others (the same
    numbers as computing it again).
    """
    qw, info, _ = _gptq(W, H, grid, name=name, blocksize=blocksize, percdamp=percdamp, act_order=act_order,
                        static_groups=static_groups, dXXT=dXXT, alpha=alpha, factor_cache=factor_cache)
    return qw, info


def _gptq(W, H, grid, *, name, blocksize, percdamp, act_order, static_groups, dXXT, alpha, factor_cache=None):
    """`gptq`, also returning the weight the sweep produced ([out, in], original column order; for tests)."""
    t0 = time.perf_counter()
    _check_weight(W, name)
    grid.check(tuple(W.shape), name)
    out_f, in_f = W.shape
    _check_square(H, in_f, "H", name)
    if dXXT is not None:
        _check_square(dXXT, in_f, "dXXT (H_Δ)", name)
    if blocksize <= 0:
        raise QuantConfigError(f"{name}: blocksize must be positive, got {blocksize}")
    gs = grid.group_size
    if act_order and gs is not None and not static_groups:
        raise QuantConfigError(f"{name}: act_order with group size {gs} needs static_groups=True "
                               f"(codes are stored in original column order with one scale per group)")

    W = W.detach().to(torch.float32).clone()
    H64 = H.detach().to(torch.float64).clone()
    dead = _fix_dead(H64)
    W[:, dead] = 0
    D = None
    if dXXT is not None:
        D = dXXT.detach().to(torch.float64).clone()
        D[:, dead] = 0

    maxq = grid.maxq
    n_groups = grid.n_groups(in_f)
    dev = W.device
    scales = torch.zeros(out_f, n_groups, dtype=torch.float32, device=dev)
    zeros = torch.zeros(out_f, n_groups, dtype=torch.float32, device=dev)
    if gs is None:
        scales[:, 0], zeros[:, 0] = fit_params(W, grid)
    elif act_order:  # static groups, fitted on the original column order
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = fit_params(W[:, g * gs:(g + 1) * gs], grid)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H64), descending=True, stable=True)
        W = W[:, perm]
        H64 = H64[perm][:, perm]
        if D is not None:
            D = D[perm][:, perm]
    # the group of each (permuted) column
    if gs is None:
        col_group = [0] * in_f
    else:
        col_group = ((perm if perm is not None else torch.arange(in_f, device=dev)) // gs).tolist()
    lazy_groups = gs is not None and not act_order
    if lazy_groups:
        # groups must lie inside a block so that they are fitted on fully updated columns
        blocksize = gs * max(1, blocksize // gs)

    key = (H.data_ptr(), tuple(H.shape), H.dtype, percdamp, act_order)  # the same live H, damping and order
    if factor_cache is not None and factor_cache.get("key") == key:
        U64, damp, rel = factor_cache["factor"]
    else:
        U64, damp, rel = _damped_cholesky(H64, percdamp, name, inverse_upper=True)
        if factor_cache is not None:
            factor_cache.update(key=key, factor=(U64, damp, rel))
    U = U64.to(torch.float32).contiguous()  # row slices U[i, i:] must be contiguous for fast updates
    P = None
    if D is not None:
        P = (alpha * torch.triu(D @ U64.T, diagonal=1) @ U64).to(torch.float32).contiguous()
    del H64, D

    # The sweep runs on transposed copies ([in, out]: a weight column is a contiguous row), which keeps the
    # per-column vector ops and rank-1 updates on contiguous memory.
    Wt = W.T.contiguous()
    del W
    codes_t = torch.zeros(in_f, out_f, dtype=torch.float32, device=dev)
    scales_t, zeros_t = scales.T.contiguous(), zeros.T.contiguous()  # [n_groups, out]
    losses = torch.zeros(in_f, dtype=torch.float64, device=dev)
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = Wt[i1:i2].clone()          # the block's columns, as rows
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        P1 = None if P is None else P[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if lazy_groups and j % gs == 0:
                g = j // gs
                scales_t[g], zeros_t[g] = fit_params(W1[i:i + gs].T, grid)
            g = col_group[j]
            s, z = scales_t[g], zeros_t[g]
            w = W1[i].clone()
            c = quantize_codes(w, s, z, maxq)
            q = s * (c - z)
            codes_t[j] = c
            err = (w - q) / U1[i, i]
            # rank-1 updates as addmm_ (BLAS), not addr_: under CPU contention addr_'s OpenMP path is ~100x slower
            W1[i:].addmm_(U1[i, i:, None], err[None, :], alpha=-1)   # W[:, i:] -= err · U[i, i:]
            if P1 is not None:
                W1[i:].addmm_(P1[i, i:, None], w[None, :])           # W[:, i:] += w · P[i, i:]
            W1[i] = q                                   # exact (the updates above give q up to rounding)
            Err1[i] = err
        losses[i1:i2] = Err1.double().pow(2).sum(dim=1)
        Wt[i1:i2] = W1                                  # the block's quantized values
        if i2 < in_f:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)   # W[:, i2:] -= Err1 · U[i1:i2, i2:]
            if P is not None:
                Wt[i2:].addmm_(P[i1:i2, i2:].T, W1)           # W[:, i2:] += W1 · P[i1:i2, i2:]

    codes, Q = codes_t.T, Wt.T
    if perm is not None:
        invperm = torch.argsort(perm)
        codes, Q = codes[:, invperm], Q[:, invperm]
    scales, zeros = scales_t.T.contiguous(), zeros_t.T
    loss = float(losses.sum())
    qw = QuantizedWeight(codes.to(torch.uint8).contiguous(), scales, zeros.to(torch.uint8).contiguous(), grid)
    info = {"damp": damp, "percdamp": rel, "loss": loss, "seconds": time.perf_counter() - t0}
    return qw, info, Q.contiguous()


# ----------------------------------------------------------------------------------------------- QEP


def qep_correct(W: torch.Tensor, H: torch.Tensor, H_delta: torch.Tensor, alpha: float, percdamp: float = 0.01,
                *, name: str = "weight") -> torch.Tensor:
    """QEP's corrected target W* = W + α · W H_Δ (H + λI)⁻¹ (then quantize W* with GPTQ under H).

    With x as column vectors (X [in, n] full precision, X̂ its partially quantized counterpart), the asymmetric
    objective ‖W X − Ŵ X̂‖² over an unconstrained Ŵ is solved by the normal equations Ŵ X̂X̂ᵀ = W X X̂ᵀ, i.e.
        Ŵ = W X X̂ᵀ (X̂X̂ᵀ)⁻¹ = W (X̂ + (X − X̂)) X̂ᵀ H⁻¹ = W + W H_Δ H⁻¹,  H = Σ x̂x̂ᵀ, H_Δ = Σ (x − x̂) x̂ᵀ,
    so α = 1 (and λ = 0) is the exact minimizer and α scales the correction. λ = percdamp · mean(diag H), dead
    inputs (H_ii = 0) get H_ii = 1, and a failed Cholesky escalates λ as in `gptq`. Computed as a Cholesky solve
    (H + λI) Mᵀ = (W H_Δ)ᵀ in float64, never an explicit inverse; returned in W's dtype.
    """
    _check_weight(W, name)
    in_f = W.shape[1]
    _check_square(H, in_f, "H", name)
    _check_square(H_delta, in_f, "H_delta", name)
    H64 = H.detach().to(torch.float64).clone()
    _fix_dead(H64)
    L, _, _ = _damped_cholesky(H64, percdamp, name, inverse_upper=False)
    W64 = W.detach().to(torch.float64)
    B = (W64 @ H_delta.detach().to(torch.float64)).T   # (W H_Δ)ᵀ [in, out]
    M = torch.cholesky_solve(B, L).T                    # W H_Δ (H + λI)⁻¹
    return (W64 + alpha * M).to(W.dtype)


# ----------------------------------------------------------------------------------------------- errors


def recon_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) = ‖(W − Ŵ) X̂‖²_F with H = X̂X̂ᵀ: the squared output error over the calibration
    set (symmetric calibration: both weights see the same inputs). Float64."""
    E = (W.detach().to(torch.float64) - W_hat.detach().to(torch.float64))
    return float(((E @ H.detach().to(torch.float64)) * E).sum())


def asym_error(W: torch.Tensor, W_hat: torch.Tensor, XXt: torch.Tensor, XhXht: torch.Tensor,
               XXht: torch.Tensor) -> float:
    """‖W X − Ŵ X̂‖²_F (the quantized layer on its actual inputs against the full-precision output) from the
    second moments XXt = Σ x xᵀ, XhXht = Σ x̂ x̂ᵀ (= H) and XXht = Σ x x̂ᵀ (= H + H_Δ):

        ‖W X − Ŵ X̂‖² = tr(W XXt Wᵀ) − 2 tr(W XXht Ŵᵀ) + tr(Ŵ XhXht Ŵᵀ).

    Computed in float64 (the terms nearly cancel). Divide by tr(W XXt Wᵀ) = ‖W X‖² for a relative error."""
    return asym_errors(W, [W_hat], XXt, XhXht, XXht)[1][0]


def asym_errors(W: torch.Tensor, W_hats: list[torch.Tensor], XXt: torch.Tensor, XhXht: torch.Tensor,
                XXht: torch.Tensor) -> tuple[float, list[float]]:
    """‖W X‖² and asym_error(W, Ŵ, ...) for each Ŵ of W_hats, sharing the products of W (4 float64 products for
    two Ŵ instead of 12); the same numbers as separate asym_error calls."""
    W64 = W.detach().to(torch.float64)
    a = ((W64 @ XXt.detach().to(torch.float64)) * W64).sum()
    WXXh = W64 @ XXht.detach().to(torch.float64)
    H64 = XhXht.detach().to(torch.float64)
    errs = []
    for W_hat in W_hats:
        Wh = W_hat.detach().to(torch.float64)
        b = (WXXh * Wh).sum()
        c = ((Wh @ H64) * Wh).sum()
        errs.append(float(a - 2 * b + c))
    return float(a), errs
