"""Pack a stream of token ids into fixed rows of ``seq_len + 1``.

Rows do not overlap: a row is a training example whose inputs are
``row[:-1]`` and labels ``row[1:]``. The packer carries the tail of each call
into the next, so no token is lost at batch or block edges; only the final
tail (shorter than a row) is left over and reported as ``remainder``.
"""

from __future__ import annotations

import numpy as np


class Packer:
    def __init__(self, row_len: int, dtype: np.dtype):
        self.row_len = row_len
        self.dtype = np.dtype(dtype)
        self._carry = np.empty(0, self.dtype)
        self.tokens_in = 0

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Full rows ``[n, row_len]`` that ``tokens`` completes (n may be 0)."""
        self.tokens_in += len(tokens)
        data = np.concatenate([self._carry, tokens.astype(self.dtype, copy=False)])
        n = len(data) // self.row_len
        cut = n * self.row_len
        self._carry = data[cut:].copy()
        return data[:cut].reshape(n, self.row_len)

    @property
    def remainder(self) -> int:
        return len(self._carry)
