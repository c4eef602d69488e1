"""Seeded random projections R^P -> R^k applied block by block, never storing the P x k matrix.

Johnson-Lindenstrauss (TRAK, Park et al. 2023, sec. 3): for a matrix ``M`` with i.i.d. entries of mean 0 and
variance 1/k, ``E ||M^T g||^2 = ||g||^2`` and inner products are preserved up to O(1/sqrt(k)).

The flat parameter vector is cut into consecutive blocks of ``block_size`` rows; block ``b`` of ``M`` is drawn
from a ``torch.Generator`` seeded with ``block_seed(seed, b)``, so ``M`` is a pure function of
``(seed, num_params, proj_dim, block_size, kind)`` and peak memory is ``block_size * proj_dim`` floats. Blocks
may be cached in memory up to ``cache_bytes`` (they are regenerated otherwise); the cache never goes to disk.
"""

from __future__ import annotations

import math

import torch

PROJECTION_KINDS = ("gaussian", "rademacher")
_SEED_MULTIPLIER = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads consecutive block ids over the seed space


def block_seed(seed: int, block: int) -> int:
    """Seed of block ``block``: a fixed mixing of ``(seed, block)`` into [0, 2^63)."""
    return (seed * _SEED_MULTIPLIER + block * 0xBF58476D1CE4E5B9 + 1) % (2**63)


class BlockwiseProjector:
    """``project(g) = g @ M`` for ``g`` of shape ``(batch, num_params)``, ``M`` of shape ``(num_params, proj_dim)``.

    Args:
        num_params (`int`): P, the dimension of the input vectors.
        proj_dim (`int`): k, the output dimension; must satisfy ``1 <= k <= P``.
        seed (`int`): determines M.
        kind (`str`): ``"gaussian"`` (entries N(0, 1/k)) or ``"rademacher"`` (entries +-1/sqrt(k)).
        block_size (`int`): rows of M generated at once.
        cache_bytes (`int`): keep generated blocks in memory while their total size stays below this (0: never).
    """

    def __init__(
        self,
        num_params: int,
        proj_dim: int,
        seed: int = 0,
        kind: str = "gaussian",
        block_size: int = 8192,
        cache_bytes: int = 256 * 1024**2,
    ) -> None:
        if not isinstance(num_params, int) or num_params < 1:
            raise ValueError(f"`num_params` must be a positive int, got {num_params!r}")
        if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim < 1:
            raise ValueError(f"`proj_dim` must be a positive int, got {proj_dim!r}")
        if proj_dim > num_params:
            raise ValueError(
                f"`proj_dim`={proj_dim} is larger than the number of parameters ({num_params}); a projection "
                "cannot have more dimensions than the gradient it compresses"
            )
        if kind not in PROJECTION_KINDS:
            raise ValueError(f"`kind` must be one of {PROJECTION_KINDS}, got {kind!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"`block_size` must be a positive int, got {block_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {seed!r}")
        self.num_params, self.proj_dim, self.seed, self.kind = num_params, proj_dim, seed, kind
        self.block_size = block_size
        self.num_blocks = math.ceil(num_params / block_size)
        self.cache_bytes = cache_bytes
        self._cache: dict[int, torch.Tensor] = {}

    @property
    def config(self) -> dict:
        return {"num_params": self.num_params, "proj_dim": self.proj_dim, "seed": self.seed, "kind": self.kind,
                "block_size": self.block_size}

    def block(self, b: int) -> torch.Tensor:
        """Rows ``[b * block_size, (b + 1) * block_size)`` of M (float32, CPU)."""
        if b in self._cache:
            return self._cache[b]
        rows = min(self.block_size, self.num_params - b * self.block_size)
        generator = torch.Generator().manual_seed(block_seed(self.seed, b))
        scale = 1.0 / math.sqrt(self.proj_dim)
        if self.kind == "gaussian":
            mat = torch.randn(rows, self.proj_dim, generator=generator).mul_(scale)
        else:
            mat = torch.randint(0, 2, (rows, self.proj_dim), generator=generator).float().mul_(2 * scale).sub_(scale)
        used = sum(m.numel() * 4 for m in self._cache.values())
        if used + mat.numel() * 4 <= self.cache_bytes:
            self._cache[b] = mat
        return mat

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat @ M`` for ``flat`` of shape ``(batch, num_params)``; returns float32 ``(batch, proj_dim)``."""
        if flat.ndim != 2 or flat.shape[1] != self.num_params:
            raise ValueError(f"expected a tensor of shape (batch, {self.num_params}), got {tuple(flat.shape)}")
        flat = flat.float()
        out = torch.zeros(flat.shape[0], self.proj_dim, dtype=torch.float32, device=flat.device)
        for b in range(self.num_blocks):
            start = b * self.block_size
            mat = self.block(b).to(flat.device)
            out.addmm_(flat[:, start : start + mat.shape[0]], mat)
        return out

    def matrix(self) -> torch.Tensor:
        """The full M (for tests and small problems only: P x k floats)."""
        return torch.cat([self.block(b) for b in range(self.num_blocks)])
