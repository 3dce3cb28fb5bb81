"""Multistep samplers a diffusers user reaches for after DDIM: DPM-Solver++ 2M and UniPC (bh2), as coefficient tables.

Both work in data prediction: step ``l`` evaluates the network at ``y_l``, forms the (clipped or thresholded) clean
prediction ``m_l`` and moves to the next level with a linear combination of the state and the last two predictions:

    y_{l+1} = pred_c[l] * c_l + pred_m0[l] * m_l + pred_m1[l] * m_{l-1}

where ``c_l = y_l`` for DPM-Solver++, and for UniPC ``c_l`` is its corrector (UniC) applied to ``y_l`` once ``m_l``
is known, which costs no network call:

    c_l = corr_c[l] * c_{l-1} + corr_m0[l] * m_l + corr_m1[l] * m_{l-1} + corr_m2[l] * m_{l-2}

The coefficients are diffusers' own (``DPMSolverMultistepScheduler.multistep_dpm_solver_*_order_update`` with
``algorithm_type="dpmsolver++", solver_type="midpoint"``; ``UniPCMultistepScheduler.multistep_uni_{p,c}_bh_update``
with ``solver_type="bh2"``), from the scheduler's sigmas, with its order rules (first order at the first step and,
with ``final_sigmas_type="zero"``, at the last; UniPC's ``lower_order_final``). They are precomputed so that a step
costs a few tensor operations rather than a diffusers ``step`` call (the loop is
:func:`policy_accel.solvers.multistep.solve_multistep`); tests/test_multistep.py checks whole chains
against diffusers' ``step`` loop on the same noise. A tail (``first_step`` > 0, for warm starts) restarts the
multistep history, as diffusers does after ``set_begin_index``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MULTISTEP_KINDS = ("dpmpp2m", "unipc")


@dataclass(frozen=True)
class MultistepTables:
    """Per-step coefficients (python floats, one entry per step of the possibly truncated chain)."""

    pred_c: list[float]
    pred_m0: list[float]
    pred_m1: list[float]
    use_corrector: list[bool]
    corr_c: list[float]
    corr_m0: list[float]
    corr_m1: list[float]
    corr_m2: list[float]
    orders: list[int]  # the predictor's order at each step


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """diffusers' ``_threshold_sample`` (Imagen's dynamic thresholding), per batch row over all other dims."""
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def _unic_coefficients(alpha_t: float, ratio: float, h: float, rk: float | None) -> tuple[float, float, float, float]:
    """UniC (bh2) at order 1 (rk None) or 2: coefficients of c_{l-1}, m_l, m_{l-1}, m_{l-2}."""
    hh = -h
    em = float(np.expm1(hh))  # h*phi_1 = B_h for bh2
    b_h = em
    if rk is None:
        rho_prev, rho_t = 0.0, 0.5
    else:
        h_phi_k = em / hh - 1
        b1 = h_phi_k / b_h
        h_phi_k = h_phi_k / hh - 0.5
        b2 = h_phi_k * 2 / b_h
        rho_prev, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2])).tolist()
    # c = ratio*c_prev - alpha*em*m_prev - alpha*B_h*(rho_prev*(m_prev2 - m_prev)/rk + rho_t*(m - m_prev))
    d = 0.0 if rk is None else alpha_t * b_h * rho_prev / rk
    return ratio, -alpha_t * b_h * rho_t, -alpha_t * em + d + alpha_t * b_h * rho_t, -d


def build_tables(kind: str, sigmas: np.ndarray, first_step: int = 0) -> MultistepTables:
    """Tables for ``kind`` over diffusers' ``sigmas`` (n + 1 values, the last 0), for steps ``first_step..n-1``."""
    if kind not in MULTISTEP_KINDS:
        raise ValueError(f"unknown multistep kind {kind!r}; valid: {', '.join(MULTISTEP_KINDS)}")
    sigmas = np.asarray(sigmas, dtype=np.float64)
    n = len(sigmas) - 1
    alpha = 1 / np.sqrt(sigmas**2 + 1)
    sig = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)  # +inf at the final sigma 0
    out: dict[str, list] = {k: [] for k in MultistepTables.__dataclass_fields__}
    for i in range(first_step, n):
        local = i - first_step
        h = lam[i + 1] - lam[i]
        em = float(np.expm1(-h))  # exp(-h) - 1; -1 at the final (zero) sigma
        ratio = float(sig[i + 1] / sig[i])
        a = float(alpha[i + 1])
        if kind == "dpmpp2m":
            order = 1 if local < 1 or i == n - 1 else 2  # diffusers: warm-up, and Euler into sigma 0
        else:
            order = min(2, n - i, local + 1)  # lower_order_final and warm-up
        if order == 1:
            m0, m1 = -a * em, 0.0
        else:
            r = (lam[i - 1] - lam[i]) / h  # UniP's rk; DPM-Solver++'s r0 = -rk
            if kind == "dpmpp2m":  # x = ratio*y - a*em*m0 - 0.5*a*em*(m0 - m1)/r0
                r0 = -r
                m0, m1 = -a * em * (1 + 0.5 / r0), 0.5 * a * em / r0
            else:  # UniP bh2, order 2: x = ratio*c - a*em*m0 - a*em*0.5*(m1 - m0)/rk
                m0, m1 = -a * em + 0.5 * a * em / r, -0.5 * a * em / r
        corrector = kind == "unipc" and local > 0
        cc = cm0 = cm1 = cm2 = 0.0
        if corrector:  # UniC on the state this step's network call was made at, with the previous step's order
            hc = lam[i] - lam[i - 1]
            rk = None if out["orders"][-1] == 1 else (lam[i - 2] - lam[i - 1]) / hc
            cc, cm0, cm1, cm2 = _unic_coefficients(float(alpha[i]), float(sig[i] / sig[i - 1]), hc, rk)
        for key, value in zip(
            MultistepTables.__dataclass_fields__,
            (ratio, m0, m1, corrector, cc, cm0, cm1, cm2, order),
            strict=True,
        ):
            out[key].append(float(value) if key not in ("use_corrector", "orders") else value)
    return MultistepTables(**out)
