"""Child processes of tests/test_store.py (run as ``python tests/store_child.py MODE ...``).

* ``featurize STORE SLEEP``: featurize :func:`build`'s model and data into STORE, sleeping SLEEP seconds in
  every forward pass, so that the parent can SIGKILL it while a chunk is in flight.
* ``rss FEATURES KERNEL N D BLOCK``: write N random D-dimensional feature rows, then the N×N kernel out of
  core in blocks of BLOCK rows; print the growth of the peak RSS (bytes) over a small warm-up kernel.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

import tangentlens as tl
from tangentlens.store import FeatureStore, featurize, kernel_from_store


def build() -> tuple[nn.Module, torch.Tensor, dict[str, Any]]:
    """The SIGKILL test's model, data and options (seeded: the same in the parent and the child)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(96, 10)
    # a tight memory budget makes the plan capture fewer examples at a time than a chunk holds
    options = dict(kind="pntk", normalize=True, projection=tl.Projection(32, seed=5), chunk_rows=8,
                   memory_budget=30_000)
    return model, x, options


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    if argv[0] == "featurize":
        model, x, options = build()
        delay = float(argv[2])
        model.register_forward_hook(lambda *_: time.sleep(delay))
        featurize(model, x, argv[1], **options)
    elif argv[0] == "rss":
        fpath, kpath, n, d, block = argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5])
        rng = np.random.default_rng(0)
        warm = rng.standard_normal((2 * block, d), dtype=np.float32)
        small = FeatureStore.from_array(fpath + "-small", warm, model_id="random", chunk_rows=block)
        kernel_from_store(small, out=kpath + "-small", block_rows=block)
        fs = FeatureStore.create(fpath, config=tl.KernelConfig(kind="trntk0"), n=n, chunk_rows=block,
                                 model_fingerprint="id:random", data_fingerprint="id:random")
        fs.allocate((d,), np.float32)
        for k in fs.pending():
            sl = fs.chunk_slice(k)
            fs.write_chunk(k, rng.standard_normal((sl.stop - sl.start, d), dtype=np.float32))
        fs.finish()
        base = _peak()
        ks = kernel_from_store(fs, out=kpath, block_rows=block, normalize=True)
        assert ks.complete
        print(_peak() - base)
    else:  # pragma: no cover
        raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
