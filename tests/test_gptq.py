"""GPTQ / GPTAQ / QEP layer solvers on synthetic correlated data (small sizes; the file runs in seconds)."""
from __future__ import annotations

import math

import pytest
import torch

from quasr.quant.gptq import _gptq, asym_error, asym_errors, gptq, qep_correct, recon_error
from quasr.quant.grid import QuantConfigError, QuantGrid, expand_groups, fit_params, rtn

OUT, IN, N = 48, 256, 1024


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These are many tiny ops: one thread is ~10x faster than OpenMP threads fighting other jobs for 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(seed: int = 0, in_f: int = IN, n: int = N) -> torch.Tensor:
    """Correlated inputs X = A Z ([in, n], columns are positions) with a few outlier channels (float64)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f, generator=g, dtype=torch.float64) / math.sqrt(in_f)
    A += 0.15 * torch.randn(in_f, 1, generator=g, dtype=torch.float64) @ torch.randn(1, in_f, generator=g,
                                                                                     dtype=torch.float64)
    X = A @ torch.randn(in_f, n, generator=g, dtype=torch.float64)
    X[[3, in_f // 6, in_f // 3, (3 * in_f) // 4]] *= 8.0
    return X


def _perturbed(X: torch.Tensor, seed: int = 1, level: float = 0.3) -> torch.Tensor:
    """X̂ = X + structured noise: a low-rank component plus an error correlated with X (as inherited error)."""
    g = torch.Generator().manual_seed(seed)
    in_f, n = X.shape
    B = torch.randn(in_f, 8, generator=g, dtype=torch.float64) / math.sqrt(8)
    C = torch.randn(in_f, in_f, generator=g, dtype=torch.float64) / math.sqrt(in_f)
    noise = 0.3 * X.std() * (B @ torch.randn(8, n, generator=g, dtype=torch.float64)) + 0.1 * (C @ X)
    return X + level * noise


def _weight(seed: int = 2, out_f: int = OUT, in_f: int = IN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    W[:, 17] *= 6  # a column with large weights
    return W


@pytest.fixture(scope="module")
def sym_data():
    X = _inputs()
    return _weight(), (X @ X.T).float()


@pytest.fixture(scope="module")
def asym_data():
    X = _inputs(seed=3)
    Xh = _perturbed(X)
    H = Xh @ Xh.T
    return {"W": _weight(seed=4), "X": X, "Xh": Xh, "H": H, "H_delta": (X - Xh) @ Xh.T, "XX": X @ X.T,
            "XXh": X @ Xh.T}


def _asym(W_hat, d) -> float:
    return asym_error(d["W"], W_hat, d["XX"], d["H"], d["XXh"])


def _on_grid(qw) -> bool:
    """Every dequantized value is scale·(k − zero) with an integer k in [0, maxq] for its row's group."""
    Wq = qw.dequantize()
    n = Wq.shape[1]
    s = expand_groups(qw.scales, n, qw.grid.group_size)
    z = expand_groups(qw.zeros.float(), n, qw.grid.group_size)
    k = Wq / s + z
    return bool((k - k.round()).abs().max() < 1e-3 and k.round().min() >= 0 and k.round().max() <= qw.grid.maxq)


GRIDS = [QuantGrid(4, 32), QuantGrid(4, 64, sym=True), QuantGrid(4, None), QuantGrid(4, None, sym=True),
         QuantGrid(3, None), QuantGrid(3, 32, sym=True), QuantGrid(3, 64, mse=True)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"w{g.bits}g{g.group_size}{'s' if g.sym else 'a'}"
                         f"{'m' if g.mse else ''}")
def test_gptq_beats_rtn_and_is_consistent(sym_data, grid):
    W, H = sym_data
    qw, info, Q = _gptq(W, H, grid, name="enc.0.fc1", blocksize=128, percdamp=0.01, act_order=False,
                        static_groups=True, dXXT=None, alpha=0.25)
    e_gptq = recon_error(W, qw.dequantize(), H)
    e_rtn = recon_error(W, rtn(W, grid).dequantize(), H)
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)
    # the stored representation is exactly the weight the sweep produced
    assert torch.equal(qw.dequantize(), Q)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == W.shape
    assert int(qw.codes.max()) <= grid.maxq
    assert qw.scales.shape == qw.zeros.shape == (OUT, grid.n_groups(IN))
    if grid.sym:
        assert (qw.zeros == 2 ** (grid.bits - 1)).all()
    assert _on_grid(qw)
    # GPTQ's accumulated error Σ e_i² is the output error under the damped H (exact identity of the updates)
    Hd = H.double() + info["damp"] * torch.eye(IN, dtype=torch.float64)
    assert info["loss"] == pytest.approx(recon_error(W, Q, Hd), rel=1e-4)
    assert info["seconds"] >= 0 and info["percdamp"] == 0.01


def test_public_gptq_matches_private_and_blocksize_does_not_matter(sym_data):
    W, H = sym_data
    grid = QuantGrid(4, 32)
    qw, info = gptq(W, H, grid, name="w")
    qw8, _ = gptq(W, H, grid, name="w", blocksize=8)  # raised to one group (32): groups never straddle blocks
    qw1, _ = gptq(W, H, QuantGrid(4, None), name="w", blocksize=1)
    qw1b, _ = gptq(W, H, QuantGrid(4, None), name="w", blocksize=100)
    assert set(info) >= {"damp", "loss", "seconds"}
    # lazy batch updates are exact up to float rounding: at most a handful of codes flip at rounding ties
    assert (qw.codes != qw8.codes).float().mean() < 0.005
    assert (qw1.codes != qw1b.codes).float().mean() < 0.005


def test_factor_cache_reuses_the_factor_and_changes_no_number(sym_data, monkeypatch):
    """Solves sharing a factor_cache under the same H factor it once and give exactly what separate solves give;
    another H (or damping) is factored afresh."""
    import quasr.quant.gptq as g

    W, H = sym_data
    grid = QuantGrid(3, 32)
    W2 = W.flip(0) * 1.5
    fresh = [gptq(w, H, grid, name="w") for w in (W, W2)]
    calls = []
    real = g._damped_cholesky
    monkeypatch.setattr(g, "_damped_cholesky", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache: dict = {}
    shared = [gptq(w, H, grid, name="w", factor_cache=cache) for w in (W, W2)]
    assert len(calls) == 1
    for (qa, ia), (qb, ib) in zip(fresh, shared):
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scales, qb.scales)
        assert ia["loss"] == ib["loss"] and ia["damp"] == ib["damp"]
    H2 = H * 2
    q3, _ = gptq(W, H2, grid, name="w", factor_cache=cache)
    q4, _ = gptq(W, H2, grid, name="w", factor_cache=cache, percdamp=0.1)
    assert len(calls) == 3
    assert torch.equal(q3.codes, gptq(W, H2, grid, name="w")[0].codes)
    assert torch.equal(q4.codes, gptq(W, H2, grid, name="w", percdamp=0.1)[0].codes)


def test_groups_are_fitted_on_the_updated_weight(sym_data):
    W, H = sym_data
    grid = QuantGrid(4, 64)
    qw, _ = gptq(W, H, grid)
    s_orig, _ = fit_params(W[:, 64:128], grid)
    # group 1 sees columns changed by the error feedback of group 0, so its scales differ from RTN's
    assert not torch.allclose(qw.scales[:, 1], s_orig)
    # ... but group 0 is fitted before any update reached it
    s0, z0 = fit_params(W[:, :64], grid)
    assert torch.equal(qw.scales[:, 0], s0) and torch.equal(qw.zeros[:, 0], z0.to(torch.uint8))


@pytest.mark.parametrize("grid", [QuantGrid(4, 32), QuantGrid(3, None), QuantGrid(4, 64, sym=True)],
                         ids=["w4g32", "w3pc", "w4g64s"])
def test_act_order_static_groups(grid):
    X = _inputs(seed=5)
    spread = torch.linspace(0.2, 3.0, IN, dtype=torch.float64)
    X *= spread[torch.randperm(IN, generator=torch.Generator().manual_seed(0))][:, None]  # act_order permutes a lot
    H = (X @ X.T).float()
    W = _weight(seed=6)
    qw, info, Q = _gptq(W, H, grid, name="dec.1.fc2", blocksize=128, percdamp=0.01, act_order=True,
                        static_groups=True, dXXT=None, alpha=0.25)
    assert torch.equal(qw.dequantize(), Q)
    e = recon_error(W, Q, H)
    assert e < 0.5 * recon_error(W, rtn(W, grid).dequantize(), H)
    # codes are in original column order: every column stays close to its own original column
    assert ((Q - W).abs().amax(dim=0) <= 3 * qw.scales.amax() + 1e-6).all()
    assert _on_grid(qw)
    # static groups: group g's parameters are those of the original columns [g·gs, (g+1)·gs)
    gs = grid.group_size or IN
    for g in range(grid.n_groups(IN)):
        s, z = fit_params(W[:, g * gs:(g + 1) * gs], grid)
        assert torch.equal(qw.scales[:, g], s) and torch.equal(qw.zeros[:, g], z.to(torch.uint8))
    Hd = H.double() + info["damp"] * torch.eye(IN, dtype=torch.float64)
    assert info["loss"] == pytest.approx(recon_error(W, Q, Hd), rel=1e-4)


def test_act_order_with_groups_needs_static_groups(sym_data):
    W, H = sym_data
    with pytest.raises(QuantConfigError, match="lin7"):
        gptq(W, H, QuantGrid(4, 32), name="lin7", act_order=True, static_groups=False)
    gptq(W, H, QuantGrid(4, None), name="lin7", act_order=True, static_groups=False)  # per channel: fine


def test_dead_input_gives_zero_column():
    X = _inputs(seed=7)
    X[[5, 130]] = 0
    H = (X @ X.T).float()
    assert H[5].abs().max() == 0 and H[:, 130].abs().max() == 0
    W = _weight(seed=8)
    for kw in [{}, {"act_order": True}, {"dXXT": torch.randn(IN, IN) * 0.1, "alpha": 1.0}]:
        qw, info = gptq(W, H, QuantGrid(4, 32), name="dead", **kw)
        Wq = qw.dequantize()
        assert torch.isfinite(Wq).all()
        assert (Wq[:, [5, 130]] == 0).all()
        assert recon_error(W, Wq, H) < recon_error(W, rtn(W, QuantGrid(4, 32)).dequantize(), H)
    target = qep_correct(W, H, torch.zeros(IN, IN), 0.5)
    assert torch.isfinite(target).all()


def test_indefinite_hessian_escalates_damping_with_warning():
    X = _inputs(seed=9, n=128)  # rank 128 < 256: H is singular
    H = X @ X.T
    H -= 0.05 * H.diag().mean() * torch.eye(IN, dtype=torch.float64)  # and indefinite: 1% damping is not enough
    W = _weight(seed=10)
    with pytest.warns(UserWarning, match=r"enc\.3\.self_attn\.k_proj.*damping 0\.1"):
        qw, info = gptq(W, H.float(), QuantGrid(4, 32), name="enc.3.self_attn.k_proj")
    assert info["percdamp"] == pytest.approx(0.1)
    assert info["damp"] == pytest.approx(0.1 * float(H.diag().mean()), rel=1e-5)
    assert torch.isfinite(qw.dequantize()).all()
    with pytest.warns(UserWarning, match="qep_layer"):
        qep_correct(W, H.float(), torch.zeros(IN, IN), 0.5, name="qep_layer")
    # hopeless: negative definite
    with pytest.raises(QuantConfigError, match="dec.0.fc1"):
        gptq(W, -(X @ X.T).float(), QuantGrid(4, 32), name="dec.0.fc1")


def test_singular_hessian_needs_no_escalation(recwarn):
    X = _inputs(seed=11, n=64)  # rank 64 < 256
    qw, info = gptq(_weight(), (X @ X.T).float(), QuantGrid(4, 32), name="s")
    assert info["percdamp"] == 0.01 and not [w for w in recwarn if "s:" in str(w.message)]


def test_bad_inputs_raise_naming_the_layer(sym_data):
    W, H = sym_data
    Wn = W.clone()
    Wn[3, 7] = float("nan")
    with pytest.raises(QuantConfigError, match="enc.1.fc2"):
        gptq(Wn, H, QuantGrid(4, 32), name="enc.1.fc2")
    Wi = W.clone()
    Wi[0, 0] = float("inf")
    with pytest.raises(QuantConfigError, match="enc.1.fc2"):
        gptq(Wi, H, QuantGrid(4, 32), name="enc.1.fc2")
    Hn = H.clone()
    Hn[1, 1] = float("nan")
    with pytest.raises(QuantConfigError, match="enc.1.fc2"):
        gptq(W, Hn, QuantGrid(4, 32), name="enc.1.fc2")
    with pytest.raises(QuantConfigError, match="enc.1.fc2.*does not divide"):
        gptq(W, H, QuantGrid(4, 96), name="enc.1.fc2")
    with pytest.raises(QuantConfigError, match="enc.1.fc2"):
        gptq(W, H[:128, :128], QuantGrid(4, 32), name="enc.1.fc2")
    with pytest.raises(QuantConfigError, match="enc.1.fc2"):
        gptq(W, H, QuantGrid(4, 32), name="enc.1.fc2", dXXT=torch.zeros(IN, IN + 1))
    with pytest.raises(QuantConfigError, match="enc.1.fc2"):
        gptq(W[0], H, QuantGrid(4, 32), name="enc.1.fc2")
    for bits in (1, 9):
        with pytest.raises(QuantConfigError):
            QuantGrid(bits, 32)
    with pytest.raises(QuantConfigError):
        QuantGrid(4, 0)


def test_error_helpers_match_direct_computation(asym_data):
    d = asym_data
    W = d["W"].double()
    W_hat = rtn(d["W"], QuantGrid(3, 32)).dequantize().double()
    direct = float(((W @ d["X"] - W_hat @ d["Xh"]) ** 2).sum())
    assert _asym(W_hat, d) == pytest.approx(direct, rel=1e-8)
    assert recon_error(W, W_hat, d["H"]) == pytest.approx(float((((W - W_hat) @ d["Xh"]) ** 2).sum()), rel=1e-8)


def test_asym_errors_shares_products_without_changing_the_numbers(asym_data):
    """The diagnostics of every fp-stream layer (err_asym_fp, err_asym) come from one asym_errors call: each
    error against its direct computation from the inputs, in the order given, and its norm ‖W X‖²."""
    d = asym_data
    W = d["W"]
    W_hat = rtn(W, QuantGrid(3, 32)).dequantize()
    X, Xh, W64 = d["X"].double(), d["Xh"].double(), W.double()
    norm, errs = asym_errors(W, [W, W_hat], d["XX"], d["H"], d["XXh"])
    assert errs[0] == pytest.approx(float(((W64 @ X - W64 @ Xh) ** 2).sum()), rel=1e-6)
    assert errs[1] == pytest.approx(float(((W64 @ X - W_hat.double() @ Xh) ** 2).sum()), rel=1e-6)
    assert norm == pytest.approx(float(((W64 @ X) ** 2).sum()), rel=1e-8)
    assert norm == _asym(torch.zeros_like(W), d)
    assert 0 < errs[0] < errs[1]  # shifted inputs alone cost less than shifted inputs and rounding


def test_qep_correct_alpha1_is_the_unconstrained_optimum(asym_data):
    d = asym_data
    W = d["W"].double()
    target = qep_correct(W, d["H"], d["H_delta"], 1.0, percdamp=0.0)
    # argmin_Ŵ ‖W X − Ŵ X̂‖² by least squares: X̂ᵀ Ŵᵀ ≈ (W X)ᵀ
    lstsq = torch.linalg.lstsq(d["Xh"].T, (W @ d["X"]).T).solution.T
    assert torch.allclose(target, lstsq, atol=1e-8, rtol=1e-6)
    assert target.dtype == torch.float64
    # α scales the correction linearly; with damping the correction is slightly shrunk
    half = qep_correct(W, d["H"], d["H_delta"], 0.5, percdamp=0.0)
    assert torch.allclose(half - W, 0.5 * (target - W), atol=1e-10)
    assert _asym(qep_correct(W, d["H"], d["H_delta"], 1.0), d) < _asym(W, d)
    assert qep_correct(d["W"], d["H"].float(), d["H_delta"].float(), 0.5).dtype == torch.float32


@pytest.mark.parametrize("grid", [QuantGrid(4, 32), QuantGrid(3, None)], ids=["w4g32", "w3pc"])
def test_asymmetric_calibration_beats_plain_gptq(asym_data, grid):
    d = asym_data
    W, H, Hd = d["W"], d["H"].float(), d["H_delta"].float()
    plain = _asym(gptq(W, H, grid)[0].dequantize(), d)
    gptaq = _asym(gptq(W, H, grid, dXXT=Hd, alpha=0.25)[0].dequantize(), d)
    gptaq_ao = _asym(gptq(W, H, grid, dXXT=Hd, alpha=0.25, act_order=True)[0].dequantize(), d)
    qep = _asym(gptq(qep_correct(W, H, Hd, 0.5), H, grid)[0].dequantize(), d)
    assert gptaq < 0.97 * plain, (gptaq, plain)
    assert gptaq_ao < 0.97 * plain, (gptaq_ao, plain)
    assert qep < 0.97 * plain, (qep, plain)


def test_gptaq_with_zero_delta_is_gptq(sym_data):
    W, H = sym_data
    a, _ = gptq(W, H, QuantGrid(4, 32))
    b, _ = gptq(W, H, QuantGrid(4, 32), dXXT=torch.zeros(IN, IN), alpha=0.25)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_gptaq_correction_orientation(alpha):
    """Input 0's error is x_0 − x̂_0 = c·x̂_5: the exact compensation moves c·W[:, 0] onto column 5.

    H_Δ = Σ (x − x̂) x̂ᵀ then has row 0 = c·H[5] and zeros elsewhere, so (undamped) P[0, R] = α c H[5, R] H_RR⁻¹ =
    α c e_5, and GPTAQ must equal GPTQ on the target W + α c W[:, 0] e_5ᵀ (column 0 is swept first, before any update
    reaches it). Per-channel grid with the row ranges set by another column, so both see the same grid."""
    X = _inputs(seed=12, in_f=64, n=512)
    Xh = X.clone()
    c = 0.7
    X[0] = Xh[0] + c * Xh[5]
    H, H_delta = (Xh @ Xh.T).float(), ((X - Xh) @ Xh.T).float()
    assert H_delta[1:].abs().max() == 0
    W = _weight(seed=13, out_f=32, in_f=64)
    W[:, [0, 5]] *= 0.3
    grid = QuantGrid(4, None)
    qa, _ = gptq(W, H, grid, dXXT=H_delta, alpha=alpha, percdamp=0.0)
    target = W.clone()
    target[:, 5] += alpha * c * W[:, 0]
    qt, _ = gptq(target, H, grid, percdamp=0.0)
    assert torch.equal(qa.scales, qt.scales)
    assert (qa.codes != qt.codes).float().mean() < 0.01
    # at 8 bits (rounding error small against the inherited error) the transposed statistic Σ x̂ (x − x̂)ᵀ fails
    g8 = QuantGrid(8, None)
    Xd, Xhd = X.float(), Xh.float()
    err = lambda q: float(((W @ Xd - q.dequantize() @ Xhd) ** 2).sum())  # noqa: E731
    e_plain = err(gptq(W, H, g8, percdamp=0.0)[0])
    e_right = err(gptq(W, H, g8, dXXT=H_delta, alpha=alpha, percdamp=0.0)[0])
    e_wrong = err(gptq(W, H, g8, dXXT=H_delta.T.contiguous(), alpha=alpha, percdamp=0.0)[0])
    assert e_right < (1 - alpha / 2) ** 2 * e_plain, (e_right, e_plain)
    assert e_right < 0.9 * e_wrong, (e_right, e_wrong)


def test_gptaq_lazy_block_update_follows_reference(asym_data):
    """Across blocks the reference's P-update uses the block's quantized values (W1 after its sweep): results
    depend (slightly) on blocksize, unlike plain GPTQ."""
    d = asym_data
    W, H, Hd = d["W"], d["H"].float(), d["H_delta"].float()
    grid = QuantGrid(4, None)
    q128, _ = gptq(W, H, grid, dXXT=Hd, alpha=1.0, blocksize=128)
    q32, _ = gptq(W, H, grid, dXXT=Hd, alpha=1.0, blocksize=32)
    p = _reference_gptaq(W, H, Hd, grid, alpha=1.0, blocksize=32)
    assert (q32.dequantize() - p).abs().max() < 1e-3 * float(p.abs().max())
    assert not torch.equal(q128.codes, q32.codes)


def _reference_gptaq(W, H, dXXT, grid, alpha, blocksize):
    """A transcription of GPTAQ.fasterquant (per-channel grid, no act_order), for comparison."""
    W = W.clone().float()
    H = H.clone().float()
    dXXT = dXXT.clone().float()
    columns = W.shape[1]
    scale, zero = fit_params(W, grid)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    dXXT[:, dead] = 0
    damp = 0.01 * torch.mean(torch.diag(H))
    H += damp * torch.eye(columns)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H.double())), upper=True).float()
    P = alpha * ((dXXT @ Hinv.T).triu_(diagonal=1)) @ Hinv
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv[i1 + i, i1 + i]
            q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, grid.maxq) - zero)
            Q[:, i1 + i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv[i1 + i, i1 + i:i2].unsqueeze(0) - \
                w.unsqueeze(1) @ P[i1 + i, i1 + i:i2].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:] - W1 @ P[i1:i2, i2:]
    return Q
