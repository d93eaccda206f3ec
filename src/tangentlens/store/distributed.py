"""Feature and kernel stores on a ``dask.distributed`` cluster: one task per chunk of examples, one per tile.

:func:`tangentlens.featurize` and :func:`tangentlens.kernel_from_store` take ``scheduler=`` (an address such
as ``"tcp://host:8786"``, a ``distributed.Client``, or a cluster object such as a ``LocalCluster``) and hand
their missing chunks to :func:`featurize_on_cluster` / :func:`kernel_on_cluster`. Dask is imported only here,
and only when ``scheduler=`` is used (extra ``tangentlens[distributed]``).

Featurization, per store:

1. The client opens (or creates) the store and checks it as in one process (configuration, model and data
   fingerprints, ``chunk_rows``), then reads the data chunk by chunk and sends each chunk not done to a
   worker (at most two per worker thread in flight: the client holds a few chunks, never the data set).
   With a :class:`~tangentlens.DataRecipe` it sends only each chunk's index range (:class:`RecipeChunk`):
   every worker process builds the data once per run and reads its chunks' examples itself, collated as the
   client would have, so the inputs never cross the network and the rows are the same.
2. The model reaches the workers once: a :class:`~tangentlens.ModelRecipe` (factory + checkpoint path) is
   built on each worker, an ``nn.Module`` is pickled to them. Every worker thread keeps one
   :class:`~tangentlens.Featurizer` for the run and checks that its model's weights hash to the client's
   (else :class:`~tangentlens.StoreMismatchError`: a factory without a seed or a checkpoint).
3. When the store has no rows yet, the first chunk runs alone: its worker plans the capture size on it
   (the memory plan, or the caller's ``block_size``), writes it and records the size, the row shape and
   the dtype in the manifest. Every later chunk is captured in blocks of that recorded size, as a resumed
   single-process run does, so the rows are bit-identical to one process's (same code:
   :func:`~tangentlens.store.featurize.chunk_features`; on other machines, as long as they run the same
   torch build on the same kind of CPU, whose arithmetic kernels decide the last bits).
4. A worker writes its chunk's rows and squared norms into the shared store and only then sets the chunk's
   done flag (each chunk and each flag in files of its own: workers never share a file). A worker that dies
   loses the chunks sent to it (a chunk's data lives on one worker): the client sends them again to the
   workers left (at most three times a chunk; the model is on every worker), and the run completes with
   the same bytes. A chunk that Dask gives up on (it was running on every worker that died: dask's
   ``distributed.scheduler.allowed-failures``) fails the run with :class:`~tangentlens.WorkerLostError`
   saying so, the chunks written are kept; a client that dies loses the chunks in flight. Either way a
   resumed call (the same call again) computes only the chunks not done.

Kernels: the client creates the kernel store, then every tile not done is a task that reads its two row
blocks from the feature stores, writes the tile (and its mirror for a symmetric kernel) and sets its flags
(:func:`~tangentlens.store.kernels.write_tile`, the single-process code). A tile's task carries only paths and
indices, so Dask itself reruns the tiles of a worker that dies on the workers left.

Every path must name the same files on every worker (a shared or local file system); the client passes
absolute paths.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pickle
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import KernelConfig
from ..errors import InputError, StoreMismatchError, WorkerLostError
from ..features import Featurizer
from ..inputs import Block, Source
from .features import FeatureStore
from .featurize import chunk_features
from .fingerprint import model_fingerprint
from .kernels import KernelStore, pending_tiles, write_tile
from .recipe import DataRecipe, ModelRecipe, slice_data

__all__ = ["connect", "featurize_on_cluster", "kernel_on_cluster", "recipe_chunks", "RecipeChunk"]

_EXTRA = "pip install 'tangentlens[distributed]'"
_IN_FLIGHT_PER_THREAD = 2
_RESENDS = 3  # a task lost with a dead worker is sent again at most this many times
_PAUSE_S = 0.5  # before resending (times the attempt): the scheduler notices the dead worker meanwhile


# ------------------------------------------------------------------------------------------- the client
@contextlib.contextmanager
def connect(scheduler: Any) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler`` for the duration (closed after, unless it was given).

    Args:
        scheduler: an address (``"tcp://host:8786"``), a ``Client`` (used as it is), or a cluster object
            with a ``scheduler_address`` (e.g. ``LocalCluster``).

    Cost: one connection; a TCP address is probed first, so a wrong host or port fails within Dask's
    connect timeout (``distributed.comm.timeouts.connect``), immediately when the port is closed.

    Raises:
        InputError: dask.distributed is not installed (the message names the extra), the scheduler is not
            an address / client / cluster, or it cannot be reached.
    """
    try:
        import dask
        import distributed
    except ImportError:
        raise InputError(f"scheduler= runs the work on dask.distributed, which is not installed: {_EXTRA} "
                         "(or run without scheduler=, in this process).") from None
    if isinstance(scheduler, distributed.Client):
        yield scheduler
        return
    address = getattr(scheduler, "scheduler_address", scheduler)
    if not isinstance(address, str) or not address:
        raise InputError(f"scheduler must be a dask scheduler address such as 'tcp://host:8786', a "
                         f"distributed.Client or a cluster; got {scheduler!r}.")
    timeout = float(dask.utils.parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s"))
    _probe(address, timeout)
    try:
        client = distributed.Client(address, timeout=timeout, set_as_default=False)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(_unreachable(address, timeout, exc)) from None
    try:
        yield client
    finally:
        client.close()


def _unreachable(address: str, timeout: float, exc: BaseException) -> str:
    return (f"Cannot reach a dask scheduler at {address!r} ({type(exc).__name__}: {exc}; waited up to "
            f"{timeout:g} s, dask's distributed.comm.timeouts.connect). Check the address (tcp://HOST:PORT, "
            "as `dask scheduler` prints it) and that the scheduler is running and reachable from here.")


def _probe(address: str, timeout: float) -> None:
    """Open (and close) a TCP connection to a ``tcp://`` address: a closed port fails at once, not after
    the client's retries (other protocols are left to the client)."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, loc = parse_address(address)
        if scheme != "tcp":
            return
        host, port = parse_host_port(loc)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{address!r} is not a dask scheduler address ({exc}); write it as "
                         "tcp://HOST:PORT (e.g. tcp://10.0.0.5:8786).") from None
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise InputError(_unreachable(address, timeout, exc)) from None


def _run_bounded(client: Any, jobs: Iterator[Callable[[], Any]], on_done: Callable[[Any], None]) -> None:
    """Submit ``jobs`` (each sends one task and returns its future) keeping at most two per worker thread in
    flight; call ``on_done(result)`` as each finishes.

    A task lost with a worker that died is sent again (the same job, up to ``_RESENDS`` times): its future
    comes back cancelled when its scattered input died with the worker, or sending it fails with an
    ``OSError`` when the worker it went to was gone. A task Dask gave up on (``KilledWorker``: every worker
    that ran it died) raises :class:`~tangentlens.WorkerLostError`; a task's own exception is raised with
    its type. The first failure cancels the rest.
    """
    from distributed import KilledWorker, as_completed
    from distributed.client import FutureCancelledError

    threads = sum(client.nthreads().values())
    limit = max(2, _IN_FLIGHT_PER_THREAD * threads)
    live: dict[Any, tuple[Callable[[], Any], int]] = {}  # future -> (its job, times its task was lost)
    queue = as_completed(loop=client.loop)

    def send(job: Callable[[], Any], lost: int) -> None:
        while True:
            try:
                fut = job()
                break
            except OSError as exc:  # the worker (or the connection) died while the task's input went out
                lost = _lost_again(lost, exc)
        live[fut] = (job, lost)
        queue.add(fut)

    def more() -> None:
        job = next(jobs, None)
        if job is not None:
            send(job, 0)

    try:
        for _ in range(limit):
            more()
        for fut in queue:
            job, lost = live.pop(fut)
            try:
                result = fut.result()  # a task's exception is raised here, with its own type
            except FutureCancelledError as exc:  # its input was lost with its worker
                fut.release()
                send(job, _lost_again(lost, exc))
                continue
            except KilledWorker as exc:
                raise WorkerLostError(
                    f"Dask gave up on a task: {exc} (dask's distributed.scheduler.allowed-failures). A "
                    "task that kills every worker it runs on usually runs out of memory: give the workers "
                    "more, or use smaller chunks (chunk_rows=, block_size=, block_rows=). What was written "
                    "is kept: run the same call again to finish it.") from exc
            fut.release()
            on_done(result)
            more()
    finally:
        if live:
            client.cancel(list(live))


def _lost_again(lost: int, exc: BaseException) -> int:
    """Count one more loss of a task, wait a little before it is sent again; after ``_RESENDS`` losses raise
    :class:`~tangentlens.WorkerLostError`."""
    lost += 1
    if lost > _RESENDS:
        raise WorkerLostError(
            f"A task was lost {lost} times with the Dask workers it was sent to ({type(exc).__name__}: "
            f"{exc}): workers keep dying or leaving. Check the workers' logs (memory, a killed process, the "
            "network). What was written is kept: run the same call again to finish it.") from exc
    time.sleep(_PAUSE_S * lost)
    return lost


class _Pickled:
    """A module pickled on the client (cloudpickle: classes defined in a script travel too) and unpickled
    as a whole on the worker — Dask's own serialization of a module's parts loses its hook dicts' types."""

    def __init__(self, module: nn.Module) -> None:
        import cloudpickle

        try:
            self.payload = cloudpickle.dumps(module)
        except Exception as exc:  # noqa: BLE001 - pickling errors have many types
            raise InputError(f"The model cannot be pickled to the Dask workers ({type(exc).__name__}: "
                             f"{exc}). Pass a tangentlens.ModelRecipe (an importable factory and a "
                             "checkpoint path) instead of the module.") from None

    def build(self) -> nn.Module:
        return pickle.loads(self.payload)


# ------------------------------------------------------------------------------------------ featurize
def featurize_on_cluster(
    client: Any,
    source: nn.Module | ModelRecipe,
    model: nn.Module,
    fs: FeatureStore,
    config: KernelConfig,
    predicted: bool,
    block_size: int | None,
    chunks: Iterator[Block] | Iterator[RecipeChunk],
    progress: Callable[[int, int], None] | None,
) -> FeatureStore:
    """Compute the chunks of ``fs`` not done yet on ``client``'s workers (see the module's description).

    Args:
        client: a connected ``distributed.Client``.
        source: what the workers build the model from (a recipe, or the module to pickle).
        model: the client's copy (its weights' fingerprint is what every worker's must equal).
        fs: the opened (checked) store.
        config: the featurization's configuration (``batch_size`` = chunk rows, ``normalize=False``).
        predicted: the label kinds use the network's predictions.
        block_size: the capture size (recorded or given), or ``None`` to plan it on the first chunk.
        chunks: every chunk of the data in order (those done are skipped): blocks, sent to the workers, or
            index ranges of a :class:`~tangentlens.DataRecipe`'s data, read by the workers.
        progress: ``progress(done, total)`` at the start and after each chunk.

    Returns:
        The store reopened (all chunks written; the caller marks it complete).
    """
    path = str(fs.path.resolve())
    job = {"path": path, "config": config.to_dict(), "config_fingerprint": fs.manifest["config_fingerprint"],
           "predicted": predicted, "weights": model_fingerprint(model), "run": uuid.uuid4().hex}
    pending = set(fs.pending())
    total = fs.n_chunks
    count = total - len(pending)
    if progress is not None:
        progress(count, total)
    todo = ((k, c) for k, c in enumerate(chunks) if k in pending)
    payload = source if isinstance(source, ModelRecipe) else _Pickled(source)
    held: list[Any] = []  # the model's future, on every worker (a worker that dies leaves the others' copies)
    sent = itertools.count()  # a task sent again gets a key of its own

    def model_on_workers() -> Any:
        if not held or held[0].status != "finished":  # (again when every worker holding it died)
            for fut in held:
                fut.release()
            held[:] = [client.scatter([payload], hash=False, broadcast=True)[0]]
        return held[0]

    def submit(k: int, chunk: Block | RecipeChunk, size: int | None) -> Any:
        src = model_on_workers()
        data = chunk if isinstance(chunk, RecipeChunk) else client.scatter([_owned(chunk)], hash=False)[0]
        return client.submit(_featurize_task, job, src, k, data, size, pure=False,
                             key=f"tl-featurize-{job['run']}-{k}-{next(sent)}")

    def done(_: Any) -> None:
        nonlocal count
        count += 1
        if progress is not None:
            progress(count, total)

    try:
        if not fs.allocated:  # the first chunk plans the capture size and records it with the row shape
            first = next(todo, None)
            if first is not None:
                _run_bounded(client, iter([lambda: submit(*first, block_size)]), done)
            fs = FeatureStore.open(path, writable=True)
            block_size = fs.block_size
        size = block_size
        _run_bounded(client, ((lambda k=k, c=c: submit(k, c, size)) for k, c in todo), done)
    finally:
        for fut in held:
            fut.release()
        with contextlib.suppress(Exception):  # best effort: the workers drop this run's featurizers
            client.run(_forget, job["run"])
    return FeatureStore.open(path, writable=True)


class RecipeChunk(NamedTuple):
    """Chunk ``[start, stop)`` of a :class:`~tangentlens.DataRecipe`'s data, read on the worker (only the
    index range and the chunk's labels, if passed separately, travel)."""

    recipe: DataRecipe
    start: int
    stop: int
    labels: torch.Tensor | None

    def block(self, run: str) -> Block:
        """The chunk as the client would have read it from the built data: the same examples, collated the
        same way (one block of ``stop - start`` examples)."""
        with _DATA_LOCK:
            built = _DATA.get(run)
            if built is None:  # built once per run and worker process (a run has one recipe)
                built = _DATA[run] = self.recipe.build()
        rows = self.stop - self.start
        part = slice_data(built, self.start, self.stop)
        blk = next(iter(Source(part, rows, self.labels, "data").blocks()))
        if blk.size != rows:
            raise InputError(f"The DataRecipe's data on this worker have fewer examples than on the client "
                             f"(chunk [{self.start}, {self.stop}) gave {blk.size}); build the same data "
                             "everywhere.")
        return Block(self.start, blk.x, blk.y)


def recipe_chunks(recipe: DataRecipe, n: int, rows: int, labels: Any) -> Iterator[RecipeChunk]:
    """The chunks of ``n`` examples, ``rows`` at a time, as index ranges of ``recipe``'s data (with the slices
    of ``labels``, a tensor given apart from the data, or ``None``)."""
    y = None if labels is None else torch.as_tensor(labels)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        yield RecipeChunk(recipe, start, stop, None if y is None else y[start:stop].clone())


def _owned(chunk: Block) -> Block:
    """``chunk`` with tensors that own their memory: a tensor view pickles its whole storage, so a chunk
    sliced from the data set would send all of it (O(N) bytes per chunk, O(N²) per run)."""

    def own(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.untyped_storage().nbytes() > v.numel() * v.element_size():
            return v.clone(memory_format=torch.contiguous_format)
        return v

    x = {k: own(v) for k, v in chunk.x.items()} if isinstance(chunk.x, Mapping) else own(chunk.x)
    return Block(chunk.start, x, own(chunk.y))


_CACHE: dict[int, tuple[tuple[str, ...], Featurizer]] = {}  # worker thread -> (run key, its featurizer)
_CACHE_LOCK = threading.Lock()
_DATA: dict[str, Any] = {}  # run -> the data built from its DataRecipe (in this worker process)
_DATA_LOCK = threading.Lock()


def _featurizer(job: dict[str, Any], source: ModelRecipe | _Pickled, block_size: int | None) -> Featurizer:
    """This worker thread's featurizer for ``job`` (built once per thread and run: the model from
    ``source``, its weights checked against the client's)."""
    key = (job["run"], job["weights"], json.dumps(job["config"], sort_keys=True), str(job["predicted"]))
    tid = threading.get_ident()
    with _CACHE_LOCK:
        entry = _CACHE.get(tid)
    if entry is not None and entry[0] == key:
        f = entry[1]
        if f.block_size == block_size or (f.planned_block_size is not None and
                                          f.planned_block_size == block_size):
            return f
    model = source.build()
    weights = model_fingerprint(model)
    if weights != job["weights"]:
        raise StoreMismatchError(
            f"The model built on a Dask worker has other weights than the client's (worker {weights[:19]}…, "
            f"client {job['weights'][:19]}…). Make the model the same everywhere: load a checkpoint in the "
            "ModelRecipe, or seed the factory's initialization (torch.manual_seed).")
    f = Featurizer(model, KernelConfig.from_dict(job["config"]), predicted=job["predicted"],
                   block_size=block_size)
    with _CACHE_LOCK:
        _CACHE[tid] = (key, f)
    return f


def _forget(run: str) -> None:
    """Drop the featurizers and the recipe-built data of run ``run`` from this worker (the run is over)."""
    with _CACHE_LOCK:
        for tid in [t for t, (key, _) in _CACHE.items() if key[0] == run]:
            del _CACHE[tid]
    with _DATA_LOCK:
        _DATA.pop(run, None)


def _featurize_task(job: dict[str, Any], source: ModelRecipe | _Pickled, k: int, chunk: Block | RecipeChunk,
                    block_size: int | None) -> int | None:
    """On a worker: capture chunk ``k`` (sent, or read from the recipe's data), write its rows and norms into
    the store, then set its flag. Returns the capture size used (the planned one on the first chunk)."""
    if isinstance(chunk, RecipeChunk):
        chunk = chunk.block(job["run"])
    fs = FeatureStore.open(job["path"], writable=True)
    if fs.manifest["config_fingerprint"] != job["config_fingerprint"]:
        raise StoreMismatchError(f"The store at {job['path']!r} was replaced by another configuration's "
                                 "while this run was writing it; run again.")
    if fs.allocated and fs.block_size is not None and block_size != fs.block_size:
        raise StoreMismatchError(f"The store at {job['path']!r} records capture size {fs.block_size}, this "
                                 f"task was sent {block_size}; run again (the recorded size is reused).")
    f = _featurizer(job, source, block_size)
    rows = chunk_features(f, chunk)
    fs.allocate(tuple(rows.shape[1:]), rows.dtype, block_size=f.planned_block_size)
    fs.write_chunk(k, rows)
    return f.planned_block_size


# -------------------------------------------------------------------------------------------- kernels
def kernel_on_cluster(client: Any, ks: KernelStore, fa: FeatureStore, fb: FeatureStore, norm: bool,
                      symmetric: bool, progress: Callable[[int, int], None] | None) -> None:
    """Write every tile of ``ks`` not done yet as a task on ``client``'s workers (the caller marks the store
    complete). ``progress(done, total)`` at the start and after each tile."""
    done = ks.done()
    total, count = done.size, int(done.sum())
    if progress is not None:
        progress(count, total)
    paths = (str(ks.path.resolve()), str(fa.path.resolve()), str(fb.path.resolve()))
    run = uuid.uuid4().hex

    def tile(i: int, j: int) -> Callable[[], Any]:
        return lambda: client.submit(_tile_task, *paths, i, j, norm, symmetric,
                                     key=f"tl-kernel-{run}-{i}-{j}", pure=False)

    def written(n: int) -> None:
        nonlocal count
        count += n
        if progress is not None:
            progress(count, total)

    _run_bounded(client, (tile(i, j) for i, j in pending_tiles(ks)), written)


def _tile_task(kpath: str, apath: str, bpath: str, i: int, j: int, norm: bool, symmetric: bool) -> int:
    """On a worker: tile (i, j) of the kernel store at ``kpath``; returns the blocks marked (1 or 2)."""
    fa = FeatureStore.open(apath)
    fb = fa if bpath == apath else FeatureStore.open(bpath)
    return write_tile(KernelStore.open(kpath, writable=True), fa, fb, i, j, norm, symmetric)
