"""Batch sources: what the trainer draws its batches from.

A batch is a dict with ``x`` (the samples), ``labels`` (class ids, token ids: whatever the objective's conditioner
reads, one row per sample) and ``seeds`` (one int64 per sample; the objective draws every random number of that
sample from it, so a sample's noise does not depend on the number of processes). The global batch of step ``k`` has
``batch_size`` samples; process ``rank`` of ``world`` trains on a share of ``batch_size // world`` of them.
``source.batches(start, rank, world, state)`` yields this process's shares of steps ``start, start + 1, ...``; its
``state_dict()`` is what a checkpoint stores to resume after the batches yielded so far.

What a resumed run sees, per source:

* :class:`TensorSource` -- tensors in memory (today's behaviour). Epochs are permutations fixed by ``(seed, epoch)``
  and the batch is a function of the step: **bit-exact** resume, with any number of processes.
* :class:`DatasetSource` -- any map-style ``torch.utils.data.Dataset`` (a Hugging Face ``datasets.Dataset`` too),
  read by a ``DataLoader`` with worker processes whose sampler gives each process its share. The same batches as
  :class:`TensorSource` on the same samples: **bit-exact** resume, with any number of processes.
* :class:`StreamSource` -- a Hugging Face ``datasets.IterableDataset`` (streamed image folders, parquet files,
  webdataset ``.tar`` shards), split over processes with ``split_dataset_by_node`` and over ``DataLoader`` workers
  by shards; each process streams its part epoch after epoch. Resume (same number of processes and workers)
  **continues at the next sample: none repeated or skipped**; with ``shuffle_buffer=k``, the samples waiting in
  the shuffle buffers at the checkpoint (at most ``k`` per worker) are skipped, none repeated.
* :class:`MappedSource` -- another source's batches through a function on the training device (a VAE and a text
  encoder: images encoded on the fly); the guarantee of the source it wraps.

Streaming needs ``pip install fastdiff[data]`` (``datasets`` and ``torchdata``'s ``StatefulDataLoader``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fastdiff.errors import InputError

__all__ = ["BatchSource", "Batches", "TensorSource", "DatasetSource", "StreamSource", "MappedSource", "ImageRows",
           "global_batch", "sample_seeds", "step_indices", "image_tensor", "load_hf", "hf_source"]  # fmt: skip

Batch = dict[str, Tensor]
_STREAM_HINT = "streaming sources need `pip install fastdiff[data]` (datasets>=2.18 and torchdata>=0.8)"


@runtime_checkable
class BatchSource(Protocol):
    """What :func:`fastdiff.training.trainer.train` needs from its data."""

    def batches(self, start: int, rank: int = 0, world: int = 1, state: dict | None = None) -> Iterator[Batch]:
        """This process's shares of the global batches of steps ``start, start + 1, ...``; ``state``: what the
        iterator's ``state_dict()`` returned at the checkpoint of step ``start`` (None when none was saved)."""
        ...


class Batches(Iterator[Batch]):
    """An iterator of batches with the ``state_dict()`` a checkpoint stores (None: the step alone says where)."""

    def __init__(self, batches: Iterator[Batch], state: Callable[[], dict | None] = lambda: None):
        self._batches, self._state = batches, state

    def __next__(self) -> Batch:
        return next(self._batches)

    def state_dict(self) -> dict | None:
        return self._state()


def sample_seeds(step: int, batch_size: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """The per-sample seeds of global step ``step``: fixed by ``(seed, step, position)``."""
    return (seed * 1_000_003 + step) * batch_size + torch.arange(batch_size, device=device)


def step_indices(n: int, step: int, batch_size: int, seed: int) -> Tensor:
    """The indices of the samples of global step ``step`` among ``n``: epochs are permutations fixed by
    ``(seed, epoch)``, cut into ``n // batch_size`` batches (the rest of each epoch is left out)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise InputError(f"trainer.batch_size={batch_size} is larger than the dataset ({n} samples)")
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * batch_size : (pos + 1) * batch_size]


def global_batch(images: Tensor, labels: Tensor, step: int, batch_size: int, seed: int, extras: dict[str, Tensor] | None = None) -> Batch:
    """The global batch of step ``step`` (:func:`step_indices`), with the per-sample seeds of :func:`sample_seeds` and
    the same rows of each of ``extras`` (e.g. reflow's ``noise``, paired with ``x``)."""
    idx = step_indices(len(images), step, batch_size, seed).to(images.device)
    rows = {k: v[idx] for k, v in (extras or {}).items()}
    return {"x": images[idx], "labels": labels[idx], "seeds": sample_seeds(step, batch_size, seed, images.device), **rows}


def _share(batch: Batch, rank: int, world: int) -> Batch:
    return {k: v.chunk(world)[rank] for k, v in batch.items()}


class TensorSource:
    """Samples and labels held as tensors (moved to the training device once): bit-exact resume. ``extras``: more
    per-sample tensors that travel with each sample (reflow's pairs: ``{"noise": ...}``)."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, seed: int = 0, extras: dict[str, Tensor] | None = None):
        extras = dict(extras or {})
        for name, values in {"labels": labels, **extras}.items():
            if len(values) != len(images):
                raise InputError(f"{len(images)} samples but {len(values)} {name}")
        self.images, self.labels, self.batch_size, self.seed, self.extras = images, labels, batch_size, seed, extras

    def to(self, device: torch.device | str) -> TensorSource:
        extras = {k: v.to(device) for k, v in self.extras.items()}
        return TensorSource(self.images.to(device), self.labels.to(device), self.batch_size, self.seed, extras)

    def batch(self, step: int) -> Batch:
        """The global batch of step ``step``."""
        return global_batch(self.images, self.labels, step, self.batch_size, self.seed, self.extras)

    def batches(self, start: int, rank: int = 0, world: int = 1, state: dict | None = None) -> Batches:
        return Batches(_share(self.batch(step), rank, world) for step in count(start))


# -- map-style datasets ------------------------------------------------------------------------------------------


def _sample(item: Any) -> dict[str, Any]:
    """A dataset item as ``{"x", "labels"}``: an ``(x, label)`` pair or a dict with those keys."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return {"x": item[0], "labels": item[1]}
    if isinstance(item, dict) and {"x", "labels"} <= set(item):
        return item
    got = f"a dict with keys {sorted(item)}" if isinstance(item, dict) else type(item).__name__
    raise InputError(f"a dataset item must be (x, label) or a dict with 'x' and 'labels'; got {got}. "
                     "Pass transform=... (e.g. fastdiff.training.data.ImageRows) to convert it")  # fmt: skip


@dataclass
class _Collate:
    """Stacks items (after ``transform``, in the worker processes) into a batch."""

    transform: Callable[[Any], Any] | None = None

    def __call__(self, items: list) -> Batch:
        samples = [_sample(self.transform(i) if self.transform else i) for i in items]
        return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("x", "labels")}


@dataclass
class _StepSampler:
    """Yields, for steps ``start, start + 1, ...``, the indices of process ``rank``'s share of the global batch."""

    n: int
    batch_size: int
    seed: int
    start: int
    rank: int
    world: int

    def __iter__(self) -> Iterator[list[int]]:
        for step in count(self.start):
            yield step_indices(self.n, step, self.batch_size, self.seed).chunk(self.world)[self.rank].tolist()


class DatasetSource:
    """A map-style dataset (``dataset[i]`` is ``(x, label)``, a dict with ``x`` and ``labels``, or anything
    ``transform`` turns into one), read by a ``DataLoader`` with ``num_workers`` worker processes. Batches are those
    of :class:`TensorSource` over the same samples (each process loads only its share): bit-exact resume."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, transform: Callable[[Any], Any] | None = None,
                 num_workers: int = 0):  # fmt: skip
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.transform, self.num_workers = transform, num_workers
        step_indices(len(dataset), 0, batch_size, seed)  # checks the size

    def batches(self, start: int, rank: int = 0, world: int = 1, state: dict | None = None) -> Batches:
        from torch.utils.data import DataLoader

        sampler = _StepSampler(len(self.dataset), self.batch_size, self.seed, start, rank, world)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=_Collate(self.transform),
                            pin_memory=torch.cuda.is_available())  # fmt: skip
        seeds = (sample_seeds(step, self.batch_size, self.seed).chunk(world)[rank] for step in count(start))
        return Batches({**b, "seeds": s} for b, s in zip(loader, seeds))


# -- streaming datasets ------------------------------------------------------------------------------------------


class _Epochs(torch.utils.data.IterableDataset):
    """A Hugging Face ``IterableDataset`` epoch after epoch (``set_epoch``), rows through ``transform``; its state
    (epoch and position) is what ``StatefulDataLoader`` saves per worker."""

    def __init__(self, dataset, transform: Callable[[Any], Any] | None):
        self.dataset, self.transform = dataset, transform
        self.epoch, self._live, self._resume = 0, None, None

    def __iter__(self) -> Iterator[Any]:
        while True:
            ds = copy.deepcopy(self.dataset)  # its own epoch counter (datasets shares one between worker processes)
            ds.set_epoch(self.epoch)
            resumed = self._resume is not None
            if resumed:
                ds.load_state_dict(self._resume)
                self._resume = None
            self._live, empty = ds, True
            for row in ds:
                empty = False
                yield self.transform(row) if self.transform else row
            if empty and not resumed:
                return  # a worker without shards, or an empty dataset
            self.epoch += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "dataset": self._live.state_dict() if self._live is not None else self._resume}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._resume, self._live = state["epoch"], state["dataset"], None


class StreamSource:
    """A Hugging Face ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``), rows turned into samples
    by ``transform`` in ``num_workers`` ``DataLoader`` workers. Each of ``world`` processes streams its own part
    (``split_dataset_by_node``: whole shards when their number divides ``world``, else every ``world``-th sample),
    ``batch_size // world`` samples a step, epoch after epoch; each epoch of a part is seen exactly once.

    Resume (same ``world`` and ``num_workers``) continues at the next sample: none repeated or skipped. With
    ``shuffle_buffer=k`` (datasets' buffer shuffle, seeded by ``seed`` and the epoch), the samples in the buffers
    at the checkpoint, at most ``k`` per worker, are skipped on resume (datasets does not save buffers).
    """

    def __init__(self, dataset, batch_size: int, transform: Callable[[Any], Any] | None = None, seed: int = 0,
                 num_workers: int = 0, shuffle_buffer: int = 0):  # fmt: skip
        try:
            import datasets
            import torchdata.stateful_dataloader  # noqa: F401
        except ImportError as err:
            raise InputError(f"{_STREAM_HINT}; {err}") from None
        if not isinstance(dataset, datasets.IterableDataset):
            raise InputError(f"StreamSource takes a datasets.IterableDataset (load_dataset(..., streaming=True)); got "
                             f"{type(dataset).__name__}. Use DatasetSource for map-style datasets")  # fmt: skip
        self.dataset, self.batch_size, self.transform, self.seed = dataset, batch_size, transform, seed
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer

    def _loader(self, rank: int, world: int):
        from datasets.distributed import split_dataset_by_node
        from torchdata.stateful_dataloader import StatefulDataLoader

        ds = self.dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer) if self.shuffle_buffer else self.dataset
        ds = split_dataset_by_node(ds, rank, world) if world > 1 else ds
        with warnings.catch_warnings():  # torchdata calls torch.set_vital, which torch deprecated
            warnings.filterwarnings("ignore", "'set_vital' is deprecated")
            return StatefulDataLoader(_Epochs(ds, self.transform), batch_size=self.batch_size // world,
                                      num_workers=self.num_workers, collate_fn=_Collate(), pin_memory=torch.cuda.is_available())

    def batches(self, start: int, rank: int = 0, world: int = 1, state: dict | None = None) -> Batches:
        loader = self._loader(rank, world)
        where = {"rank": rank, "world": world, "num_workers": self.num_workers}
        if state is not None:
            _check_state(state, where, start)
            loader.load_state_dict(state["loader"])
        elif start:
            raise InputError(f"a streaming source cannot start at step {start} without the data state saved at that step's "
                             "checkpoint (data_state_*.pt); resume from a checkpoint written with this source")  # fmt: skip
        position = {"step": start}

        def stream() -> Iterator[Batch]:
            for step in count(start):
                try:
                    batch = next(it)
                except StopIteration:
                    raise InputError(f"the stream of process {rank} of {world} yielded no samples; check the dataset and "
                                     "that it has at least one sample (or shard) per process") from None  # fmt: skip
                position["step"] = step + 1
                yield {**batch, "seeds": sample_seeds(step, self.batch_size, self.seed).chunk(world)[rank]}

        it = iter(loader)
        return Batches(stream(), lambda: {**where, "step": position["step"], "loader": loader.state_dict()})


def _check_state(state: dict, where: dict, start: int) -> None:
    """Refuse a streaming state written for another process layout or step."""
    saved = {k: state.get(k) for k in where}
    if saved != where:
        raise InputError(f"the checkpoint's data state was written with {saved}, this run has {where}; a streaming "
                         "source resumes only with the same number of processes and workers")  # fmt: skip
    if state.get("step") != start:
        raise InputError(f"the checkpoint's data state is at step {state.get('step')}, the run resumes at step {start}")


# -- on-device transforms ----------------------------------------------------------------------------------------


class MappedSource:
    """Another source's batches, each moved to the training device and passed through ``fn`` there (e.g. a VAE and
    a text encoder: a streamed image folder encoded on the fly). ``fn`` sees one process's share, so it must treat
    each sample on its own (random numbers from ``seeds``). Resume: the guarantee of ``source``."""

    def __init__(self, source: BatchSource, fn: Callable[[Batch], Batch], device: torch.device | str = "cpu"):
        self.source, self.fn, self.device = source, fn, device
        if hasattr(source, "batch_size"):
            self.batch_size = source.batch_size

    def to(self, device: torch.device | str) -> MappedSource:
        if isinstance(self.fn, torch.nn.Module):
            self.fn.to(device)
        return MappedSource(self.source.to(device) if hasattr(self.source, "to") else self.source, self.fn, device)

    def batches(self, start: int, rank: int = 0, world: int = 1, state: dict | None = None) -> Batches:
        inner = self.source.batches(start, rank, world, state)
        mapped = (self.fn({k: v.to(self.device, non_blocking=True) for k, v in b.items()}) for b in inner)
        return Batches(mapped, getattr(inner, "state_dict", lambda: None))


# -- Hugging Face datasets ---------------------------------------------------------------------------------------


def image_tensor(img, resolution: int | None = None, channels: int = 3) -> Tensor:
    """A PIL image as a ``(channels, H, W)`` float tensor in ``[-1, 1]``; with ``resolution``, the shorter side
    resized to it (bicubic) and the centre square kept."""
    from fastdiff.datasets import image_pixels
    from fastdiff.images import from_pixels

    return from_pixels(torch.from_numpy(image_pixels(img, resolution, channels)))


@dataclass
class ImageRows:
    """Turns a Hugging Face row into a sample: ``image_column`` through :func:`image_tensor`, ``label_column`` as an
    int64 label (0 for every row when None). Webdataset shards name columns by extension (``png``, ``cls``)."""

    image_column: str = "image"
    label_column: str | None = "label"
    resolution: int | None = None
    channels: int = 3

    def __call__(self, row: dict) -> dict[str, Tensor]:
        missing = [c for c in (self.image_column, self.label_column) if c is not None and c not in row]
        if missing:
            raise InputError(f"the dataset's rows have no column {missing[0]!r} (columns: {', '.join(row)}); set image_column / label_column")
        label = torch.tensor(int(row[self.label_column]) if self.label_column else 0)
        return {"x": image_tensor(row[self.image_column], self.resolution, self.channels), "labels": label}


def load_hf(path: str | Path, split: str = "train", streaming: bool = False, **kwargs: Any):
    """A Hugging Face dataset: a local folder of parquet files, of webdataset ``.tar`` shards, or of images (an
    ``imagefolder``: ``metadata.jsonl`` adds captions or labels), a local parquet / ``.tar`` file, or a Hub name."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise InputError(f"Hugging Face datasets need `pip install fastdiff[data]`; {err}") from None
    local = Path(path)
    files = sorted(local.rglob("*")) if local.is_dir() else [local] if local.is_file() else []
    for builder, suffix in (("parquet", ".parquet"), ("webdataset", ".tar")):
        matched = [str(f) for f in files if f.suffix == suffix]
        if matched:
            return load_dataset(builder, data_files=matched, split=split, streaming=streaming, **kwargs)
    if local.is_dir():
        return load_dataset("imagefolder", data_dir=str(local), split=split, streaming=streaming, **kwargs)
    if local.exists():
        raise InputError(f"{local}: expected a folder, a .parquet or a .tar file")
    return load_dataset(str(path), split=split, streaming=streaming, **kwargs)


def hf_source(path: str | Path, batch_size: int, transform: Callable[[dict], Any] | None = None, *, split: str = "train",
              streaming: bool = False, seed: int = 0, num_workers: int = 0, shuffle_buffer: int = 0) -> BatchSource:  # fmt: skip
    """A source over :func:`load_hf` ``(path, split, streaming)``: a :class:`StreamSource` when streaming, else a
    :class:`DatasetSource` (map-style, bit-exact resume). ``transform`` defaults to :class:`ImageRows`."""
    dataset = load_hf(path, split, streaming)
    transform = transform or ImageRows()
    if streaming:
        return StreamSource(dataset, batch_size, transform, seed, num_workers, shuffle_buffer)
    return DatasetSource(dataset, batch_size, seed, transform, num_workers)
