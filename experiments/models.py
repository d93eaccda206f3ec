"""Reference architectures and training recipes of the method's small binary experiments.

Transcribed from the method's public code, ``pnnl/projection_ntk``,
``scripts/smallmodeltrain/Analyze_multiple_NTK_{MLP_MNIST2,CNN_MNIST2,CNN_FMNIST2}.py``:

* every ``nn.Linear`` / ``nn.Conv2d`` weight and bias is drawn from N(0, 1) ("NTK parameterization");
  the width scaling is applied in ``forward`` (activations divided by sqrt(width) after each layer);
* one output logit (C = 1); the network's class-1 probability is ``sigmoid(f(x))``;
* MNIST2 (MLP and CNN): plain SGD, lr 1e-3, batch 4, shuffled, 100 epochs, loss
  ``MSE(sigmoid(f(x)), y)``;
* FMNIST2 CNN: Adam, lr 1e-3, batch 4, *not* shuffled, 200 epochs, loss ``MSE(f(x) - f_0(x), y)``
  with ``f_0`` the frozen network at initialisation (a "centered" model); predictions and confidences
  are nevertheless read from the uncentered ``sigmoid(f(x))``, as the reference does.

The training here is vectorized over seeds: a group of models (one per seed, each initialised exactly as
``torch.manual_seed(seed); Model(); ntk_normal_init``) is stacked with ``torch.func.stack_module_state``
and trained together (batched matmuls for the MLP, one grouped convolution per layer for the CNN); each
model draws its own mini-batch order from ``torch.Generator().manual_seed(seed)``. SGD and Adam act
element-wise, so one optimizer over the stacked tensors equals one optimizer per model. Results are
deterministic for a fixed group of seeds on a given machine (float summation order can depend on the
group size).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import stack_module_state

__all__ = [
    "ReferenceMLP",
    "ReferenceCNN",
    "ntk_normal_init",
    "Recipe",
    "SETTINGS",
    "Setting",
    "make_model",
    "train_group",
    "predict_logits",
    "CenteredModel",
]


def ntk_normal_init(module: nn.Module) -> None:
    """Draw every Linear/Conv2d weight and bias from N(0, 1), in module order (the reference's init)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight)
            if m.bias is not None:
                nn.init.normal_(m.bias)


class ReferenceMLP(nn.Module):
    """MLP 784-100-100-100-1 with NTK scaling: ``f = l4(relu(l3(relu(l2(relu(l1(x)/10))/10))/10))``.

    (The reference divides the first layer by sqrt(100), not sqrt(784); kept as is.)
    Parameters: 98,801.
    """

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(784, 100)
        self.l2 = nn.Linear(100, 100)
        self.l3 = nn.Linear(100, 100)
        self.l4 = nn.Linear(100, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) or (B, 784) -> (B, 1) logits."""
        y = x.reshape(x.shape[0], -1)
        y = F.relu(self.l1(y) / 10.0)
        y = F.relu(self.l2(y) / 10.0)
        y = F.relu(self.l3(y) / 10.0)
        return self.l4(y)


class ReferenceCNN(nn.Module):
    """The reference CNN (WIDTH = 8) for 28x28 grey images, one logit.

    conv3x3(1->64) relu /sqrt(576) -> avgpool2 relu -> conv3x3(64->32) relu /sqrt(288) -> avgpool2 relu
    -> conv3x3(32->8) relu /sqrt(72) -> avgpool2 relu -> flatten(72) -> fc(72->128) relu /sqrt(128)
    -> fc(128->64) relu /sqrt(64) -> fc(64->1). Parameters: 39,081.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(1, 8 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(8 * width, 4 * width, 3, padding=1)
        self.conv5 = nn.Conv2d(4 * width, width, 3, padding=1)
        self.fc1 = nn.Linear(width * 3 * 3, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 64) feeding ``fc3`` (the conjugate-kernel features)."""
        w = self.width
        y = F.relu(self.conv1(x)) / math.sqrt(8 * w * 9)
        y = F.relu(F.avg_pool2d(y, 2))
        y = F.relu(self.conv3(y)) / math.sqrt(4 * w * 9)
        y = F.relu(F.avg_pool2d(y, 2))
        y = F.relu(self.conv5(y)) / math.sqrt(w * 9)
        y = F.relu(F.avg_pool2d(y, 2))
        y = y.reshape(y.shape[0], -1)
        y = F.relu(self.fc1(y)) / math.sqrt(128)
        return F.relu(self.fc2(y)) / math.sqrt(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) -> (B, 1) logits."""
        return self.fc3(self.features(x))


@dataclass(frozen=True)
class Recipe:
    """A training recipe.

    Attributes:
        optimizer: ``"sgd"`` (plain, no momentum) or ``"adam"`` (torch defaults).
        lr: learning rate.
        epochs: passes over the training set.
        batch_size: examples per step (per model).
        shuffle: reshuffle every epoch (seeded per model) or keep file order.
        loss: ``"mse_sigmoid"``: mean (sigmoid(f) - y)^2; ``"mse_centered"``: mean (f - f_0 - y)^2.
    """

    optimizer: str
    lr: float
    epochs: int
    batch_size: int
    shuffle: bool
    loss: str


@dataclass(frozen=True)
class Setting:
    """One experiment setting: data set, architecture, recipe and the reference's numbers."""

    data: str
    arch: str
    recipe: Recipe
    ref_tau: float
    ref_nn_acc: float
    ref_kglm_acc: float


_SGD100 = Recipe("sgd", 1e-3, 100, 4, True, "mse_sigmoid")
SETTINGS: dict[str, Setting] = {
    "mnist2-mlp": Setting("mnist2", "mlp", _SGD100, 0.708, 0.9964, 0.9967),
    "mnist2-cnn": Setting("mnist2", "cnn", _SGD100, 0.857, 0.9838, 0.9815),
    "fmnist2-cnn": Setting(
        "fmnist2", "cnn", Recipe("adam", 1e-3, 200, 4, False, "mse_centered"), 0.882, 0.9795, 0.9567
    ),
}

_ARCHS: dict[str, Callable[[], nn.Module]] = {"mlp": ReferenceMLP, "cnn": ReferenceCNN}


def make_model(arch: str, seed: int) -> nn.Module:
    """Build and initialise one reference model: ``torch.manual_seed(seed)``, construct, N(0, 1) init."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(_ARCHS)}")
    torch.manual_seed(seed)
    model = _ARCHS[arch]()
    ntk_normal_init(model)
    return model


def _mlp_stacked(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
    """ReferenceMLP forward on stacked, *transposed* parameters: (S, B, ...) -> (S, B, 1).

    ``p[name + ".weight"]`` is (S, in, out) and ``p[name + ".bias"]`` (S, 1, out), so the batched
    matmuls need no transposed copies (the training loop is memory-bound on the weights).
    """
    y = xb.reshape(xb.shape[0], xb.shape[1], -1)
    for name in ("l1", "l2", "l3"):
        y = torch.relu(torch.baddbmm(p[f"{name}.bias"], y, p[f"{name}.weight"]) / 10.0)
    return torch.baddbmm(p["l4.bias"], y, p["l4.weight"])


def _cnn_stacked(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
    """ReferenceCNN forward on stacked parameters: (S, B, 1, 28, 28) -> (S, B, 1).

    The same function as ``vmap(functional_call(ReferenceCNN))`` (tested to float rounding), written for
    speed on a CPU (1.1-1.5x fewer milliseconds per training step: ``benchmarks/train_cnn_step.py``,
    results in ``benchmarks/RESULTS.md``):

    * the convolutions of the S models are one grouped convolution over an (B, S*C, H, W) layout, kept
      from the input to the flatten;
    * each conv layer's width scaling (division by sqrt(out_channels * 9), as in ``ReferenceCNN``)
      divides its weight and bias (S*C*C'*9 numbers) instead of its activation map (B*S*C*H*W
      numbers): relu(z)/c = relu(z/c) for c > 0;
    * the relu after each average pooling is left out: the pooled values are averages of relu outputs,
      so they are >= 0 and the relu is the identity, with the same gradients (where a pooled value is 0,
      all its inputs are 0 and their relu already passes no gradient).
    """
    s, bb = xb.shape[0], xb.shape[1]
    y = xb.transpose(0, 1).reshape(bb, s * xb.shape[2], xb.shape[3], xb.shape[4])
    for name in ("conv1", "conv3", "conv5"):
        w = p[f"{name}.weight"]  # (S, out, in, 3, 3)
        c = 1.0 / math.sqrt(w.shape[1] * 9)
        y = F.conv2d(y, (w * c).flatten(0, 1), (p[f"{name}.bias"] * c).flatten(), padding=1, groups=s)
        y = F.avg_pool2d(F.relu(y), 2)
    y = y.reshape(bb, s, -1).transpose(0, 1)  # (S, B, 72)
    for name in ("fc1", "fc2"):
        w = p[f"{name}.weight"]  # (S, out, in)
        y = F.relu(torch.baddbmm(p[f"{name}.bias"][:, None], y, w.mT)) / math.sqrt(w.shape[1])
    return torch.baddbmm(p["fc3.bias"][:, None], y, p["fc3.weight"].mT)


def _to_mlp_layout(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: (v.mT.contiguous() if k.endswith("weight") else v[:, None, :].contiguous()) for k, v in p.items()
    }


def _from_mlp_layout(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.mT if k.endswith("weight") else v[:, 0, :]) for k, v in p.items()}


def train_group(
    arch: str,
    seeds: Sequence[int],
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    *,
    epochs: int | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, Callable[[torch.Tensor], torch.Tensor]], None] | None = None,
    checkpoint: Path | None = None,
) -> tuple[list[nn.Module], dict[str, float]]:
    """Train one model per seed, vectorized over the seeds.

    Args:
        arch: ``"mlp"`` or ``"cnn"``.
        seeds: one model per seed.
        x: inputs (N, 1, 28, 28) in the default dtype (the models are built in it; float32 here).
        y: labels (N,), 0/1.
        recipe: the training recipe.
        epochs: override ``recipe.epochs`` (CPU budget); the override is recorded by the caller.
        progress: print one line per epoch.
        on_epoch: called after every epoch with (epoch, predict) where ``predict(x)`` returns the
            current (S, N) logits of all models (no gradients), e.g. to log test accuracy.
        checkpoint: file that holds the training state (stacked parameters, optimizer state, every
            model's shuffling-generator state, epochs done). Written atomically after every epoch; if it
            exists when training starts, training resumes from it, so an interrupted run continues
            where it stopped and gives the same models bit for bit. A checkpoint of other seeds, data
            size or recipe raises ``ValueError``; one that has all epochs returns the trained models at
            once; a longer ``epochs`` continues training from it.

    Returns:
        The trained models (eval mode, CPU) and ``{"train_seconds": ..., "final_loss": ...}``.

    Cost: ``epochs * N / batch_size`` optimizer steps, each a forward and backward of
    ``len(seeds) * batch_size`` examples; the centered loss adds one no-grad pass of the initial
    networks over the training set (their outputs are fixed, so they are read once).
    """
    rec = replace(recipe, epochs=epochs) if epochs is not None else recipe
    models = [make_model(arch, s) for s in seeds]
    params, buffers = stack_module_state(models)
    params = {k: v.detach().clone() for k, v in params.items()}
    if arch == "mlp":
        params = _to_mlp_layout(params)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    vf = _mlp_stacked if arch == "mlp" else _cnn_stacked
    n = x.shape[0]
    s_count = len(seeds)
    if rec.loss == "mse_centered":
        # the frozen initial networks' outputs on the training set, once: (S, N); ``params`` still
        # holds the initialisation here (a checkpoint is loaded below)
        with torch.no_grad():
            f0 = torch.cat(
                [vf(params, buffers, xc.expand(s_count, *xc.shape))[..., 0] for xc in x.split(256)], dim=1
            )
    elif rec.loss != "mse_sigmoid":
        raise ValueError(f"unknown loss {rec.loss!r}")
    if rec.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(list(params.values()), lr=rec.lr)
    elif rec.optimizer == "adam":
        opt = torch.optim.Adam(list(params.values()), lr=rec.lr)
    else:
        raise ValueError(f"unknown optimizer {rec.optimizer!r}")

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    yf = y.to(x.dtype)
    # the epoch budget is not part of a run's identity: the first k epochs do not depend on it
    ident = {
        "seeds": [int(s) for s in seeds],
        "n": int(n),
        "arch": arch,
        "recipe": asdict(rec) | {"epochs": None},
    }
    start_epoch, done_s, last = 0, 0.0, float("nan")
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["ident"] != ident:
            raise ValueError(
                f"checkpoint {checkpoint} belongs to another run ({state['ident']}), not {ident}; "
                "remove it or choose another output folder."
            )
        if state["epoch"] > rec.epochs:
            raise ValueError(f"checkpoint {checkpoint} is past epoch {rec.epochs} (at {state['epoch']}).")
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(state["params"][k])
        opt.load_state_dict(state["opt"])
        for g, gs in zip(gens, state["gens"]):
            g.set_state(gs)
        start_epoch, done_s, last = state["epoch"], state["train_seconds"], state["loss"]
        if progress:
            print(f"  [{arch} seeds {seeds[0]}..{seeds[-1]}] resumed after epoch {start_epoch}", flush=True)
    t0 = time.perf_counter() - done_s
    for ep in range(start_epoch, rec.epochs):
        if rec.shuffle:
            order = torch.stack([torch.randperm(n, generator=g) for g in gens])  # (S, N)
        else:
            order = torch.arange(n).expand(s_count, n)
        tot = 0.0
        steps = 0
        for start in range(0, n, rec.batch_size):
            idx = order[:, start : start + rec.batch_size]  # (S, B)
            xb = x[idx]  # (S, B, ...)
            yb = yf[idx]
            out = vf(params, buffers, xb)[..., 0]  # (S, B)
            if rec.loss == "mse_sigmoid":
                per_model = ((torch.sigmoid(out) - yb) ** 2).mean(dim=1)
            else:
                per_model = ((out - f0.gather(1, idx) - yb) ** 2).mean(dim=1)
            opt.zero_grad(set_to_none=True)
            per_model.sum().backward()
            opt.step()
            tot += float(per_model.detach().mean())
            steps += 1
        last = tot / max(steps, 1)
        if on_epoch is not None:

            def predict(xe: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    xs = xe.unsqueeze(0).expand(s_count, *xe.shape)
                    return vf(params, buffers, xs)[..., 0]

            on_epoch(ep + 1, predict)
        if checkpoint is not None:
            _save_atomic(
                {
                    "ident": ident,
                    "epoch": ep + 1,
                    "params": {k: v.detach() for k, v in params.items()},
                    "opt": opt.state_dict(),
                    "gens": [g.get_state() for g in gens],
                    "train_seconds": time.perf_counter() - t0,
                    "loss": last,
                },
                Path(checkpoint),
            )
        if progress:
            el = time.perf_counter() - t0
            print(
                f"  [{arch} seeds {seeds[0]}..{seeds[-1]}] epoch {ep + 1}/{rec.epochs} "
                f"loss {last:.4g} ({el:.0f}s)",
                flush=True,
            )
    train_s = time.perf_counter() - t0
    final = {k: v.detach() for k, v in params.items()}
    if arch == "mlp":
        final = _from_mlp_layout(final)
    out_models = []
    for i, m in enumerate(models):
        m.load_state_dict({k: v[i].clone() for k, v in final.items()}, strict=False)
        m.eval()
        out_models.append(m)
    return out_models, {"train_seconds": train_s, "final_loss": last, "epochs": float(rec.epochs)}


def _save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CenteredModel(nn.Module):
    """``g(x) = f(x) - f_0(x) - shift`` with ``f_0`` a frozen copy of the network at initialisation.

    The FMNIST2 recipe trains ``f - f_0`` to regress the 0/1 labels, so the class-1 score of the trained
    function is ``f - f_0 - 0.5`` (``shift=0.5``). ``f_0``'s parameters do not require gradients, so
    kernels of ``g`` are kernels of ``f`` with respect to the trained parameters.
    """

    def __init__(self, model: nn.Module, init: nn.Module, shift: float = 0.5) -> None:
        super().__init__()
        self.model = model
        self.init = init
        self.shift = shift
        for p in self.init.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B, 1) centered scores."""
        return self.model(x) - self.init(x) - self.shift


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Eval-mode logits (N,) of a one-logit model, in batches, without gradients."""
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            outs.append(model(x[i : i + batch_size])[:, 0])
    return torch.cat(outs)
