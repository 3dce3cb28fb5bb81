"""The block lower-bidiagonal linear systems of parallel Newton, solved in a fixed number of operators."""

from __future__ import annotations

import math

import torch

RECURSIONS = ("loop", "scan")
# Elements of a dense (T*D)^2 system per batch row beyond which "loop" also runs in blocks (256 MiB in float32).
DENSE_LIMIT = 1 << 26


class BlockRecursion:
    """All d_{j+1} = A_j d_j + c_j (j = 0..T-1, d_0 = 0) in a fixed number of operators, whatever T.

    The steps are cut into nb blocks of K. Each block is a unit lower block-bidiagonal system in its K*D unknowns,
    solved densely (one batched triangular solve, all blocks side by side) both for its own offsets and for the
    map from the state entering it; one more triangular solve chains the nb block boundaries as affine maps on
    [g; 1] (so its right-hand side is constant), and one batched product fills every state. K = T (one block) is
    forward substitution, the sequential recursion in one kernel; K ~ sqrt(T) is a two-level parallel scan.

    Buffers and views are built once. Callers write the coupling negated (-A_j, into ``source``) and the offsets
    negated (-c_j, into ``offsets``) in place, call :meth:`load` and :meth:`solve`, and get -d: with both signs
    flipped, every intermediate the boundary system needs is a plain copy.
    """

    def __init__(self, T: int, B: int, D: int, block: int, dtype: torch.dtype, device: torch.device):
        K = max(1, min(block, T))
        nb = math.ceil(T / K)
        Tp = nb * K
        self.T, self.B, self.D, self.K, self.nb = T, B, D, K, nb
        cols = D + 1 if nb > 1 else 1  # the entering state's map (D columns) and the block's offsets
        zeros = dict(dtype=dtype, device=device)
        self.zero = torch.zeros((), **zeros)  # `where(..., out=)` takes tensors only
        # -A_j for every (padded) step; padding steps stay 0 and so never couple.
        self.source = torch.zeros(Tp, B, D, D, **zeros)
        src = self.source.view(nb, K, B, D, D)
        self._m1 = torch.zeros(B, nb, K * D, K * D, **zeros)  # strictly lower part used; unit diagonal implied
        m1 = self._m1.view(B, nb, K, D, K, D)
        # Block (i+1, i) of block n holds -A_{nK+i+1}: a (nb, K-1, B, D, D) view of the matrices.
        self._m1_sub = torch.diagonal(m1, offset=-1, dim1=2, dim2=4).permute(1, 4, 0, 2, 3)
        self._src_sub = src[:, 1:]
        self._rhs1 = torch.zeros(B, nb, K * D, cols, **zeros)
        self._x1 = torch.zeros_like(self._rhs1)
        self.offsets = self._rhs1.view(B, Tp, D, cols)[:, :T, :, cols - 1 :].permute(1, 0, 2, 3)  # (T, B, D, 1)
        if nb > 1:
            # The state entering block n acts on the block's first state through A_{nK}, written as -A_{nK}: with the
            # offsets negated too, each block's solution [maps | local] is minus the affine map [Phi | l] from its
            # entering state g to its states (d = Phi g + l).
            self._entry = self._rhs1.view(B, nb, K, D, cols)[:, :, 0, :, :D].permute(1, 0, 2, 3)  # (nb, B, D, D)
            self._src_entry = src[:, 0]
            last = self._x1.view(B, nb, K, D, cols)[:, :, K - 1]  # (B, nb, D, D+1): -(map to each block's last state)
            # Boundaries as [g_n; 1], n = 0..nb-1: [g_0; 1] = e, [g_n; 1] - [[Phi, l], [0, 1]]_{n-1} [g_{n-1}; 1] = 0.
            E = D + 1
            self._m2 = torch.zeros(B, nb * E, nb * E, **zeros)
            sub = torch.diagonal(self._m2.view(B, nb, E, nb, E), offset=-1, dim1=1, dim2=3)  # (B, E, E, nb-1)
            sub[:, D, D].fill_(-1.0)
            self._m2_sub = sub[:, :D]  # (B, D, D+1, nb-1) <- -[Phi, l] of blocks 0..nb-2
            self._last_map = last[:, : nb - 1].permute(0, 2, 3, 1)
            self._rhs2 = torch.zeros(B, nb * E, 1, **zeros)
            self._rhs2.view(B, nb, E)[:, 0, D] = 1.0
            self._boundary = torch.zeros(B * nb, E, 1, **zeros)  # [g_n; 1] per (row, block)
            self._boundary_out = self._boundary.view(B, nb * E, 1)
            self._states = self._x1.view(B * nb, K * D, cols)
            self._delta = torch.zeros(B * nb, K * D, 1, **zeros)
            delta = self._delta.view(B, Tp, D, 1)
        else:
            delta = self._x1.view(B, Tp, D, 1)
        self.delta = delta[:, :T].permute(1, 0, 2, 3)  # (T, B, D, 1): -d_1..-d_T

    def load(self, use: torch.Tensor) -> None:
        """Write the coupling from ``source`` into the systems, zeroed for rows where ``use`` (1, B, 1, 1) is False."""
        if self.K > 1:
            torch.where(use, self._src_sub, self.zero, out=self._m1_sub)
        if self.nb > 1:
            torch.where(use, self._src_entry, self.zero, out=self._entry)

    def solve(self) -> torch.Tensor:
        """-d_1..-d_T (for offsets -c) as a (T, B, D, 1) view of a buffer this object reuses."""
        torch.linalg.solve_triangular(self._m1, self._rhs1, upper=False, unitriangular=True, out=self._x1)
        if self.nb > 1:
            self._m2_sub.copy_(self._last_map)
            torch.linalg.solve_triangular(self._m2, self._rhs2, upper=False, unitriangular=True, out=self._boundary_out)
            torch.bmm(self._states, self._boundary, out=self._delta)  # -(Phi g + l) = [maps | local] [g; 1]
        return self.delta


def recursion_block(method: str, T: int, B: int, D: int) -> int:
    """Block length of a recursion: ``loop`` one block (dense forward substitution) while it fits DENSE_LIMIT,
    ``scan`` (and ``loop`` beyond the limit) about sqrt(T)."""
    if method not in RECURSIONS:
        raise ValueError(f"unknown recursion {method!r}; valid: {', '.join(RECURSIONS)}")
    if method == "loop" and B * (T * D) ** 2 <= DENSE_LIMIT:
        return T
    return math.ceil(math.sqrt(T))
