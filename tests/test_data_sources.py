"""Batch sources: TensorSource gives the old global batches exactly; a map-style DatasetSource (torch or Hugging
Face dataset, worker processes) gives the same batches; streamed parquet / imagefolder / webdataset shards show every
sample of an epoch exactly once to 2 processes together; a training run stopped and resumed keeps each source's
guarantee (bit-exact for map-style; for streaming the same samples in the same steps: none repeated or skipped),
and a shuffle buffer loses at most its size on resume, repeating nothing. Datasets are built here; nothing downloads."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fastdiff.datasets import LabeledData
from fastdiff.errors import InputError
from fastdiff.objectives.base import LossOutput, Objective, per_sample_randn
from fastdiff.training.checkpoints import load_data_state
from fastdiff.training.data import DatasetSource, ImageRows, StreamSource, TensorSource, hf_source, load_hf
from fastdiff.training.trainer import TrainerConfig, train

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
datasets = pytest.importorskip("datasets")
pytest.importorskip("torchdata")
datasets.disable_progress_bars()


def _old_global_batch(images, labels, step, batch_size, seed):
    """The trainer's batch before batch sources (commit 4a993da), kept verbatim as the reference."""
    n = len(images)
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    idx = perm[pos * batch_size : (pos + 1) * batch_size].to(images.device)
    seeds = (seed * 1_000_003 + step) * batch_size + torch.arange(batch_size, device=images.device)
    return {"x": images[idx], "labels": labels[idx], "seeds": seeds}


def _data(n=10):
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(1)), torch.arange(n)


def _take(it, k):
    return [next(it) for _ in range(k)]


def _equal(a, b):
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("start", [0, 3])
def test_tensor_source_is_the_old_global_batch(start):
    images, labels = _data()
    source = TensorSource(images, labels, batch_size=4, seed=7)
    for world in (1, 2):
        for rank in range(world):
            old = [{k: v.chunk(world)[rank] for k, v in _old_global_batch(images, labels, s, 4, 7).items()} for s in range(start, start + 5)]
            assert _equal(_take(source.batches(start, rank, world), 5), old)  # 5 steps: across epochs (2 per epoch)


def test_map_style_source_gives_the_tensor_source_batches():
    images, labels = _data()
    tensors = TensorSource(images, labels, 4, seed=3)
    for world, rank, start, workers in ((1, 0, 0, 2), (2, 0, 3, 0), (2, 1, 1, 1)):
        mapped = DatasetSource(LabeledData(images, labels, 10), 4, seed=3, num_workers=workers)
        assert _equal(_take(mapped.batches(start, rank, world), 5), _take(tensors.batches(start, rank, world), 5))
    rows = datasets.Dataset.from_dict({"x": images.tolist(), "label": labels.tolist()})  # a Hugging Face map-style dataset
    hf = DatasetSource(rows, 4, seed=3, transform=lambda r: {"x": torch.tensor(r["x"]), "labels": r["label"]})
    assert _equal(_take(hf.batches(2, 1, 2), 4), _take(tensors.batches(2, 1, 2), 4))
    with pytest.raises(InputError, match="batch_size=4 is larger than the dataset"):
        DatasetSource(LabeledData(images[:3], labels[:3], 10), 4)
    with pytest.raises(InputError, match="must be \\(x, label\\) or a dict with 'x' and 'labels'; got a dict with keys \\['label', 'x'\\]"):
        next(DatasetSource(rows, 4).batches(0))


# -- streamed datasets built here ---------------------------------------------------------------------------------


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((3, 5, 3), value, np.uint8)).save(buf, format="png")
    return buf.getvalue()


def _parquet(folder, shards, per_shard):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    for s in range(shards):
        pq.write_table(pa.table({"id": list(range(s * per_shard, (s + 1) * per_shard))}), folder / f"part-{s}.parquet")
    return folder


def _imagefolder(folder, n):
    folder.mkdir()
    for i in range(n):
        (folder / f"{i}.png").write_bytes(_png(10 * i))
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "id": i, "text": f"photo {i}"}) + "\n" for i in range(n)))
    return folder


def _webdataset(folder, shards, per_shard):
    folder.mkdir()
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                for ext, data in (("png", _png(10 * i)), ("cls", str(i).encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def _ids(row):
    return {"x": torch.tensor([row["id"] / 10, 1.0]), "labels": torch.tensor(row["id"])}


STREAMS = {  # name: (builder, transform, number of samples, workers)
    "parquet, shards split over processes": (lambda p: _parquet(p, 4, 6), _ids, 24, 2),
    "parquet, samples split over processes": (lambda p: _parquet(p, 3, 4), _ids, 12, 0),
    "imagefolder with metadata.jsonl": (lambda p: _imagefolder(p, 8), ImageRows(label_column="id"), 8, 0),
    "webdataset tar shards": (lambda p: _webdataset(p, 2, 4), ImageRows("png", "cls"), 8, 1),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_two_processes_together_see_each_sample_of_an_epoch_once(tmp_path, name):
    build, transform, n, workers = STREAMS[name]
    source = hf_source(build(tmp_path / "data"), 4, transform, streaming=True, num_workers=workers)
    assert isinstance(source, StreamSource)
    seen = []
    for rank in range(2):
        batches = _take(source.batches(0, rank, 2), n // 4)  # 2 samples per process and step: one epoch in all
        assert all(b["x"].shape[0] == 2 and torch.equal(b["seeds"], torch.arange(4 * s, 4 * s + 4).chunk(2)[rank]) for s, b in enumerate(batches))
        seen += [i for b in batches for i in b["labels"].tolist()]
    assert sorted(seen) == list(range(n))
    if isinstance(transform, ImageRows):  # the pixels are the sample's own: 10 * id, in [-1, 1]
        for b in _take(source.batches(0, 1, 2), 2):
            torch.testing.assert_close(b["x"], (10 * b["labels"].float() / 127.5 - 1).view(-1, 1, 1, 1).expand_as(b["x"]))


def test_stream_resumes_at_the_next_sample(tmp_path):
    data = _parquet(tmp_path / "data", 4, 6)
    source = StreamSource(load_hf(data, streaming=True), 4, _ids, num_workers=2)
    it = source.batches(0, 1, 2)
    stream = _take(it, 5)
    torch.save(it.state_dict(), tmp_path / "state.pt")  # as in a checkpoint
    state5 = torch.load(tmp_path / "state.pt", weights_only=True)
    stream += _take(it, 3)  # across the end of the epoch (6 steps of this process's 12 samples)
    state8 = it.state_dict()
    stream += _take(it, 5)
    assert _equal(_take(source.batches(5, 1, 2, state5), 8), stream[5:])
    assert _equal(_take(source.batches(8, 1, 2, state8), 5), stream[8:])
    state = state5
    with pytest.raises(InputError, match="resumes only with the same number of processes and workers"):
        source.batches(5, 0, 1, state)
    with pytest.raises(InputError, match="cannot start at step 5 without the data state"):
        source.batches(5, 1, 2)


def test_shuffle_buffer_loses_at_most_its_size_on_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # datasets waits 5 s when a shuffled stream is dropped
    source = StreamSource(load_hf(_parquet(tmp_path / "data", 2, 12), streaming=True), 2, _ids, seed=5, shuffle_buffer=4)
    it = source.batches(0)
    before = [i for b in _take(it, 3) for i in b["labels"].tolist()]
    assert before != sorted(before)  # shuffled
    resumed = source.batches(3, state=it.state_dict())
    rest = [i for b in _take(resumed, 7) for i in b["labels"].tolist()]  # 14 = 24 - 6 seen - at most 4 lost
    assert len(set(before + rest)) == 20  # nothing repeated


# -- interrupted and resumed training runs ------------------------------------------------------------------------


class Stop(Exception):
    pass


class Recorder(Objective):
    """A linear model on the samples; records which samples each step saw, and can stop the run at a step."""

    phases = ("main",)

    def __init__(self, stop_at: int | None = None):
        super().__init__()
        self.net, self.seen, self.stop_at = nn.Linear(2, 1), {}, stop_at

    def parameters_for(self, phase):
        return self.net.parameters()

    def forward(self, batch, phase, step):
        if step == self.stop_at:
            raise Stop
        self.seen[step] = batch["labels"].tolist()
        x = batch["x"].float() + 0.1 * per_sample_randn(batch["x"].float(), batch["seeds"], 0)
        return LossOutput({"mse": ((self.net(x) - 1) ** 2).mean()})

    def export(self):
        return self.net


def _source(kind, tmp_path):
    if kind == "map-style":
        return DatasetSource(LabeledData(torch.stack([_ids({"id": i})["x"] for i in range(24)]), torch.arange(24), 24), 4, num_workers=1)
    return StreamSource(load_hf(tmp_path / "data", streaming=True), 4, _ids, num_workers=2)


@pytest.mark.parametrize("kind", ["map-style", "streaming"])
def test_stopped_and_resumed_run_sees_the_same_samples(tmp_path, kind):
    """Stopped at step 5 (checkpoint 3: mid-epoch), then at step 8 (checkpoint 6: an epoch's end), resumed each time:
    the same samples in the same steps and bit-identical weights as the uninterrupted run."""
    _parquet(tmp_path / "data", 4, 6)
    cfg = TrainerConfig(steps=10, batch_size=4, checkpoint_every=3, log_every=100, tracker="none", ema_decay=0.5)
    torch.manual_seed(0)
    full = Recorder()
    reference, _ = train(full, _source(kind, tmp_path), None, cfg, tmp_path / "full", {"r": 1}, progress=False)
    seen, resume = {}, None
    for stop_at in (5, 8, None):
        torch.manual_seed(0)
        run = Recorder(stop_at)
        try:
            result, record = train(run, _source(kind, tmp_path), None, cfg, tmp_path / "run", {"r": 1}, resume=resume, progress=False)
        except Stop:
            pass
        assert all(seen.get(step, ids) == ids for step, ids in run.seen.items())  # steps done again: the same samples
        seen.update(run.seen)
        resume = "latest"
    assert record["start_step"] == 6
    assert seen == full.seen
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), result.state_dict().values(), strict=True))
    state = load_data_state(tmp_path / "run" / "checkpoints" / "step_00000009", 0)
    assert (state is None) == (kind == "map-style")  # only a streaming source saves where it stands


TORCHRUN_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from test_data_sources import Recorder, _ids
from fastdiff.training.data import StreamSource, load_hf
from fastdiff.training.trainer import TrainerConfig, train

torch.manual_seed(0)
run = Recorder()
cfg = TrainerConfig(steps=6, batch_size=4, checkpoint_every=3, log_every=100, tracker="none", ema_decay=0.5)
source = StreamSource(load_hf({data!r}, streaming=True), 4, _ids, num_workers=1)
model, record = train(run, source, None, cfg, {out!r}, {{"r": 1}}, resume=sys.argv[2] if len(sys.argv) > 2 else None, progress=False)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(__import__("os").environ["RANK"])
json.dump({{"seen": run.seen, "weights": [p.tolist() for p in model.parameters()]}}, open(sys.argv[1] + f"-{{rank}}.json", "w"))
"""


@pytest.mark.slow
def test_torchrun_streaming_run_splits_epochs_and_resumes(tmp_path):
    """2 gloo processes stream their own shards (each sample of the epoch once in all), save a data state each in the
    checkpoint, and a run resumed from it sees the same samples per process and ends with the same weights."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(root / "tests"), data=str(_parquet(tmp_path / "data", 4, 6)), out=str(tmp_path / "run")))

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523", str(script),
               str(tmp_path / args[0]), *args[1:]]  # fmt: skip
        done = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return [json.loads((tmp_path / f"{args[0]}-{rank}.json").read_text()) for rank in range(2)]

    full = torchrun("full")
    assert sorted(i for r in full for ids in r["seen"].values() for i in ids) == list(range(24))  # 6 steps x 4: one epoch
    assert all((tmp_path / "run" / "checkpoints" / "step_00000003" / f"data_state_{rank}.pt").is_file() for rank in range(2))
    resumed = torchrun("resumed", "latest")
    for a, b in zip(full, resumed):
        assert sorted(b["seen"]) == ["3", "4", "5"] and all(b["seen"][k] == a["seen"][k] for k in b["seen"])
        assert a["weights"] == b["weights"]
