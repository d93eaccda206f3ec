"""Feature and kernel stores on a dask.distributed cluster: bit-identical to one process, resumable, the
model rebuilt on the workers from a recipe (and checked), a worker killed mid-run, clear errors for a bad
scheduler or a missing dask, and the CLI's --scheduler.

Most tests run on an in-process cluster (two worker threads: starts at once); the tests marked slow run on
real worker processes (each imports torch and tangentlens once: 10-30 s on a busy 2-core machine)."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tangentlens as tl
from tangentlens.cli import main
from tangentlens.errors import InputError, StoreMismatchError
from tangentlens.store import FeatureStore, ModelRecipe, featurize, kernel_from_store

from .models import cnn, data, mlp

distributed = pytest.importorskip("distributed")

PROJ = dict(kind="pntk", normalize=True, projection=tl.Projection(48, seed=3))
IDENTITY = ("config_fingerprint", "model_fingerprint", "data_fingerprint", "labels", "n", "chunk_rows",
            "n_chunks", "row_shape", "dtype", "block_size", "status")


pytestmark = pytest.mark.usefixtures("one_thread")  # as the workers (dask sets OMP_NUM_THREADS=1)


@pytest.fixture(scope="module")
def cluster():
    """Two workers with one thread each, in this process."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0",
                                  worker_dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def processes():
    """Two worker processes with one thread each, tangentlens imported on them (once for the module)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  worker_dashboard_address=None) as c, \
            distributed.Client(c, set_as_default=False) as client:
        client.run(__import__, "tangentlens.store.distributed")
        yield c


def _bytes_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def _same_store(a: FeatureStore, b: FeatureStore) -> None:
    assert _bytes_equal(a[:], b[:]) and _bytes_equal(a.sqnorms[:], b.sqnorms[:])
    assert {k: a.manifest[k] for k in IDENTITY} == {k: b.manifest[k] for k in IDENTITY}
    assert a.manifest["config"] == b.manifest["config"] and b.complete


def unseeded_mlp() -> nn.Module:
    """A factory without a seed: every process gets other weights."""
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


# ------------------------------------------------------------------------------------------ featurize
_CASES = {
    # name: (factory, data, options, labels, how the workers get the model)
    "mlp-proj-pNTK": (mlp, "mlp", PROJ, None, "recipe"),
    "cnn-proj-pNTK": (cnn, "cnn", PROJ, None, "module"),
    "cnn-trNTK0": (cnn, "cnn", dict(kind="trntk0"), None, "recipe"),  # exact flat rows
    "mlp-margin": (mlp, "mlp", dict(kind="margin"), "true", "module"),  # a label kind
    "mlp-margin-predicted": (mlp, "mlp", dict(kind="margin"), "predicted", "recipe"),
}


def _compare(case: str, scheduler: object, tmp_path: Path) -> None:
    factory, name, options, labels, how = _CASES[case]
    x = data(name, 37)
    y = torch.arange(37) % 3 if labels == "true" else labels
    ref = featurize(factory(), x, tmp_path / "ref", labels=y, chunk_rows=8, **options)
    calls = []
    model = ModelRecipe(factory) if how == "recipe" else factory()
    fs = featurize(model, x, tmp_path / "dist", labels=y, chunk_rows=8, scheduler=scheduler,
                   progress=lambda d, t: calls.append((d, t)), **options)
    _same_store(ref, fs)
    assert calls == [(k, 5) for k in range(6)]


@pytest.mark.parametrize("case", ["cnn-proj-pNTK", "mlp-margin"])
def test_the_distributed_store_is_the_single_process_store(case, cluster, tmp_path):
    _compare(case, cluster, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_CASES))
def test_on_worker_processes_the_store_is_the_single_process_store(case, processes, tmp_path):
    _compare(case, processes.scheduler_address, tmp_path)


def test_a_given_block_size_is_recorded_and_used_by_every_worker(cluster, tmp_path):
    x = data("cnn", 30)
    with distributed.Client(cluster, set_as_default=False) as client:
        fs = featurize(ModelRecipe(cnn), x, tmp_path / "d", chunk_rows=12, block_size=5, scheduler=client,
                       **PROJ)
        assert client.status == "running"  # a given Client is left open
    ref = featurize(cnn(), x, tmp_path / "ref", chunk_rows=12, block_size=5, **PROJ)
    assert fs.block_size == 5
    _same_store(ref, fs)


class _Stop(Exception):
    pass


def test_a_partial_distributed_run_resumes_to_the_same_store(cluster, tmp_path):
    x, model = data("mlp", 64), mlp()  # built before any task runs (mlp() seeds torch's global RNG)
    ref = featurize(model, x, tmp_path / "ref", chunk_rows=8, **PROJ)

    def stop_after_three(done: int, total: int) -> None:
        if done >= 3:
            raise _Stop

    with pytest.raises(_Stop):
        featurize(ModelRecipe(mlp), x, tmp_path / "d", chunk_rows=8, scheduler=cluster,
                  progress=stop_after_three, **PROJ)
    part = FeatureStore.open(tmp_path / "d", allow_incomplete=True)
    assert not part.complete and part.block_size == ref.block_size
    time.sleep(0.5)  # tasks already running when the client stopped may still land (same bytes either way)
    left = len(FeatureStore.open(tmp_path / "d", allow_incomplete=True).pending())
    assert 0 < left <= 8 - 3
    calls = []
    fs = featurize(ModelRecipe(mlp), x, tmp_path / "d", scheduler=cluster,
                   progress=lambda d, t: calls.append(d), **PROJ)
    assert calls[-1] == 8 and len(calls) <= left + 1  # only the missing chunks were computed
    _same_store(ref, fs)
    # and a store begun on the cluster can be finished in one process (and vice versa)
    with pytest.raises(_Stop):
        featurize(ModelRecipe(mlp), x, tmp_path / "e", chunk_rows=8, scheduler=cluster,
                  progress=stop_after_three, **PROJ)
    _same_store(ref, featurize(model, x, tmp_path / "e", **PROJ))


def test_workers_refuse_a_model_with_other_weights(cluster, tmp_path):
    torch.manual_seed(0)
    with pytest.raises(StoreMismatchError, match="other weights than the client's"):
        featurize(ModelRecipe(unseeded_mlp), data("mlp", 16), tmp_path / "d", chunk_rows=8,
                  scheduler=cluster, **PROJ)


def test_a_recipe_loads_its_checkpoint(cluster, tmp_path):
    trained = mlp()
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(1.5)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "ckpt.pt")
    recipe = ModelRecipe(functools.partial(mlp, d_in=6), checkpoint=tmp_path / "ckpt.pt")
    assert Path(recipe.checkpoint).is_absolute()
    x = data("mlp", 20)
    fs = featurize(recipe, x, tmp_path / "d", chunk_rows=8, scheduler=cluster, **PROJ)
    _same_store(featurize(trained, x, tmp_path / "ref", chunk_rows=8, **PROJ), fs)
    _same_store(fs, featurize(recipe, x, tmp_path / "here", chunk_rows=8, **PROJ))  # a recipe, no cluster
    with pytest.raises(InputError, match="does not fit the factory's model"):
        ModelRecipe(functools.partial(mlp, d_in=5), checkpoint=tmp_path / "ckpt.pt").build()


# --------------------------------------------------------------------------------------- a worker dies
class SlowOnWorkers(nn.Module):
    """``mlp()`` whose forward, on a Dask worker, touches ``marks/<pid>`` and then sleeps: a test sees which
    worker is inside a task and kills it there."""

    def __init__(self, marks: Path) -> None:
        super().__init__()
        self.net, self.marks = mlp(), str(marks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            distributed.get_worker()
        except ValueError:  # in the test's process
            return self.net(x)
        (Path(self.marks) / str(os.getpid())).touch()
        time.sleep(0.1)
        return self.net(x)


def _kill_once(pid: int, ready: Callable[[], bool], killed: list[int], armed: list[threading.Thread]) -> None:
    """SIGKILL process ``pid`` as soon as ``ready()`` (once), from a thread: the client goes on sending tasks
    meanwhile (waiting here, in its progress callback, could starve the victim of work)."""
    if killed or armed:
        return

    def watch() -> None:
        deadline = time.monotonic() + 60
        while not ready():
            if time.monotonic() > deadline:
                return  # the test's `assert killed` reports it
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    armed.append(threading.Thread(target=watch, daemon=True))
    armed[0].start()


@pytest.mark.slow
def test_a_worker_killed_mid_run_costs_nothing_but_time(tmp_path):
    """Features: the chunks lost with the killed worker (its running task, the data sent to it) are sent
    again to the worker left; kernel tiles: Dask reruns them. Both stores are the single-process bytes."""
    marks = tmp_path / "marks"
    marks.mkdir()
    x, model = data("mlp", 64), SlowOnWorkers(marks)
    ref = featurize(model, x, tmp_path / "ref", chunk_rows=8, **PROJ)
    kref = kernel_from_store(ref, out=tmp_path / "K-ref", block_rows=8)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  worker_dashboard_address=None) as c, \
            distributed.Client(c, set_as_default=False) as client:
        client.run(__import__, __name__)  # both workers import this module (the model's class) at once
        (_, victim), (survivor, _) = client.run(os.getpid).items()
        killed: list[int] = []
        armed: list[threading.Thread] = []
        calls: list[int] = []

        def in_forward(done: int, total: int) -> None:  # after two chunks: kill inside the victim's forward
            calls.append(done)
            if done >= 2 and not armed:
                (marks / str(victim)).unlink(missing_ok=True)
                _kill_once(victim, (marks / str(victim)).exists, killed, armed)

        fs = featurize(model, x, tmp_path / "d", chunk_rows=8, scheduler=client, progress=in_forward, **PROJ)
        armed[0].join(timeout=60)
        assert killed, "the worker to kill never entered a task"
        assert calls == list(range(9))
        _same_store(ref, fs)

        client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed worker: kill the new one
        ((fresh, victim),) = [(w, p) for w, p in client.run(os.getpid).items() if w != survivor]
        killed.clear()
        armed.clear()

        def with_tiles(done: int, total: int) -> None:  # from the first tile on: kill it holding tiles
            _kill_once(victim, lambda: bool(client.processing([fresh]).get(fresh)), killed, armed)

        ks = kernel_from_store(fs, out=tmp_path / "K", block_rows=8, scheduler=client, progress=with_tiles)
        armed[0].join(timeout=60)
        assert killed, "the fresh worker never held a tile"
        assert ks.complete and _bytes_equal(ks[...], kref[...])


# ---------------------------------------------------------------------------------- data from a recipe
_BUILT: list[int] = []  # one entry per call of counted_data (in-process workers share this list)


def counted_data(name: str, n: int) -> torch.Tensor:
    _BUILT.append(os.getpid())
    return data(name, n)


def labelled_dataset(n: int) -> torch.utils.data.Dataset:
    """A map-style Dataset of (image, label) items: the workers read their chunks by index."""
    return torch.utils.data.TensorDataset(data("cnn", n), torch.arange(n) % 3)


@pytest.mark.parametrize("case", ["mlp-proj-pNTK", "mlp-margin"])
def test_workers_read_their_chunks_from_a_data_recipe(case, cluster, tmp_path):
    factory, name, options, labels, _ = _CASES[case]
    y = torch.arange(37) % 3 if labels == "true" else labels
    ref = featurize(factory(), data(name, 37), tmp_path / "ref", labels=y, chunk_rows=8, **options)
    _BUILT.clear()
    recipe = tl.DataRecipe(functools.partial(counted_data, name, 37))
    fs = featurize(ModelRecipe(factory), recipe, tmp_path / "dist", labels=y, chunk_rows=8, scheduler=cluster,
                   **options)
    _same_store(ref, fs)  # the manifest's data fingerprint too: the client hashed the data it built
    assert 2 <= len(_BUILT) <= 3  # the client once, each worker that ran chunks once for the run
    one = featurize(factory(), recipe, tmp_path / "one", labels=y, chunk_rows=8, **options)  # no scheduler
    _same_store(ref, one)


def test_a_dataset_recipe_with_labels_on_the_cluster(cluster, tmp_path):
    recipe = tl.DataRecipe(functools.partial(labelled_dataset, 29))
    ref = featurize(cnn(), labelled_dataset(29), tmp_path / "ref", chunk_rows=8, kind="margin")
    fs = featurize(ModelRecipe(cnn), recipe, tmp_path / "dist", chunk_rows=8, kind="margin",
                   scheduler=cluster)
    _same_store(ref, fs)


def test_a_data_recipe_must_be_read_by_index(tmp_path):
    with pytest.raises(InputError, match="callable"):
        tl.DataRecipe(3)  # type: ignore[arg-type]
    loader = tl.DataRecipe(functools.partial(torch.utils.data.DataLoader, labelled_dataset(8)))
    with pytest.raises(InputError, match="map-style Dataset"):
        featurize(cnn(), loader, tmp_path / "s", **PROJ)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_on_worker_processes_a_data_recipe_gives_the_single_process_store(processes, tmp_path):
    recipe = tl.DataRecipe(functools.partial(data, "cnn", 37))
    ref = featurize(cnn(), data("cnn", 37), tmp_path / "ref", chunk_rows=8, **PROJ)
    fs = featurize(cnn(), recipe, tmp_path / "dist", chunk_rows=8, scheduler=processes.scheduler_address,
                   **PROJ)
    _same_store(ref, fs)


# -------------------------------------------------------------------------------------------- kernels
def test_kernels_on_the_cluster_are_the_single_process_kernels(cluster, tmp_path):
    x, t = data("cnn", 45), data("cnn", 13, seed=1)
    train = featurize(cnn(), x, tmp_path / "train", chunk_rows=16, **PROJ)
    test = featurize(cnn(), t, tmp_path / "test", chunk_rows=16, **PROJ)
    for name, (a, b) in {"K_train": (train, None), "K_test": (test, train)}.items():
        ref = kernel_from_store(a, b, out=tmp_path / f"{name}-ref", block_rows=16)
        calls: list[int] = []
        ks = kernel_from_store(a, b, out=tmp_path / name, block_rows=16, scheduler=cluster.scheduler_address,
                               progress=lambda d, n, calls=calls: calls.append(d))
        assert ks.complete and _bytes_equal(ks[...], ref[...])
        assert ks.manifest["rows"] == ref.manifest["rows"] and calls[0] == 0 and calls[-1] == ks.done().size


def test_a_partial_kernel_on_the_cluster_resumes_to_the_same_bytes(cluster, tmp_path):
    train = featurize(mlp(), data("mlp", 50), tmp_path / "train", chunk_rows=10, **PROJ)
    ref = kernel_from_store(train, out=tmp_path / "ref", block_rows=10)

    def stop(done: int, total: int) -> None:
        if done >= 6:
            raise _Stop

    with pytest.raises(_Stop):
        kernel_from_store(train, out=tmp_path / "K", block_rows=10, scheduler=cluster, progress=stop)
    part = tl.KernelStore.open(tmp_path / "K", allow_incomplete=True)
    assert not part.complete and 6 <= part.done().sum() < 25
    ks = kernel_from_store(train, out=tmp_path / "K", block_rows=10, scheduler=cluster)
    assert ks.complete and _bytes_equal(ks[...], ref[...])


# ------------------------------------------------------------------------------------- bad schedulers
def test_a_bad_scheduler_is_a_clear_error_quickly(tmp_path):
    x = data("mlp", 8)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="Cannot reach a dask scheduler at 'tcp://127.0.0.1:1'"):
        featurize(mlp(), x, tmp_path / "a", scheduler="tcp://127.0.0.1:1", **PROJ)
    with pytest.raises(InputError, match="not a dask scheduler address.*tcp://HOST:PORT"):
        featurize(mlp(), x, tmp_path / "b", scheduler="no-port-here", **PROJ)
    with pytest.raises(InputError, match="scheduler must be a dask scheduler address"):
        kernel_from_store(tmp_path / "c", out=tmp_path / "k", scheduler=3)
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "a").exists()  # nothing was written


def test_scheduler_without_dask_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` fails
    with pytest.raises(InputError, match=r"pip install 'tangentlens\[distributed\]'"):
        featurize(mlp(), data("mlp", 8), tmp_path / "a", scheduler="tcp://127.0.0.1:8786", **PROJ)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_the_cli_runs_featurize_and_kernel_on_the_cluster(processes, cli_project, capsys):
    root = cli_project  # tl.toml (its store under out/) and mlp.pt; one.toml: the same, stored under one/
    (root / "one.toml").write_text((root / "tl.toml").read_text().replace('"out/store"', '"one/store"'))
    address = processes.scheduler_address  # the workers import cli_example through the config's python_path
    for command in ("featurize", "kernel"):
        assert main([command, str(root / "tl.toml"), "--scheduler", address, "--no-progress"]) == 0
        assert main([command, str(root / "one.toml"), "--no-progress"]) == 0
    for name in ("trNTK", "proj-pNTK"):
        for split in ("train", "test"):
            _same_store(FeatureStore.open(root / "one" / "store" / name / split),
                        FeatureStore.open(root / "out" / "store" / name / split))
        for k in ("K_train", "K_test"):
            a = tl.KernelStore.open(root / "one" / "store" / name / k)
            b = tl.KernelStore.open(root / "out" / "store" / name / k)
            assert _bytes_equal(a[...], b[...])
    capsys.readouterr()
    assert main(["featurize", str(root / "tl.toml"), "--scheduler", "tcp://127.0.0.1:1", "--resume",
                 "--no-progress"]) == 1
    assert "Cannot reach a dask scheduler" in capsys.readouterr().err
