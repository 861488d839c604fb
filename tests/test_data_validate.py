"""InstructionDataset.validate in worker processes and split between the processes of a distributed run: the same
records, lengths, items, skip report and first error as one process checking every record itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cmlora import vlm
from cmlora.data import DataError, InstructionDataset, load_records

from .data_helpers import save_image, vf_record, write_jsonl
from .synthetic_data import write_records


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return vlm.tiny(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Ten records (images of several sizes, a text-only one) with a corrupt image at 3 and a too-long one at 6."""
    folder = tmp_path_factory.mktemp("data")
    rows = []
    for index in range(10):
        if index == 3:
            (folder / "broken.png").write_bytes(b"not a png")
            rows.append(vf_record(f"r{index}", "broken.png"))
        elif index == 6:
            rows.append(vf_record(f"r{index}", None, "chat", ("word " * 400, "a")))
        elif index == 8:
            rows.append(vf_record(f"r{index}", None, "chat", ("Say yes.", "yes")))
        else:
            save_image(folder / f"{index}.png", (20 * index, 0, 255 - 20 * index), (24 + 4 * index, 40))
            rows.append(vf_record(f"r{index}", f"{index}.png", "color", ("<image>\nWhat colour?", f"c{index}")))
    return write_jsonl(folder / "train.jsonl", rows)


def dataset(model_dir, data, **options) -> InstructionDataset:
    records, _ = load_records(data)
    return InstructionDataset(records, vlm.load(model_dir)[1], max_length=256, **options)


def items_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key] for key in a)


@pytest.mark.parametrize("keep_encoded", [False, True])
def test_workers_keep_what_one_process_keeps(model_dir, data, keep_encoded):
    alone = dataset(model_dir, data, skip_bad_records=True, keep_encoded=keep_encoded)
    report = alone.validate()
    workers = dataset(model_dir, data, skip_bad_records=True, keep_encoded=keep_encoded)
    report_in_workers = workers.validate(workers=2)
    assert report.counts == {"corrupt image": 1, "answer truncated away": 1}
    assert (report_in_workers.counts, report_in_workers.examples) == (report.counts, report.examples)
    assert [record.id for record in workers.records] == [record.id for record in alone.records]
    assert workers.lengths == alone.lengths and len(set(alone.lengths)) > 1
    if keep_encoded:  # every item came back from a worker, whole, in the process's own memory
        assert sorted(workers._encoded) == list(range(len(workers)))
        assert all(items_equal(workers._encoded[index], alone._encoded[index]) for index in range(len(workers)))
        pixels = workers._encoded[0]["pixel_values"]
        assert not pixels.is_shared()
    for index in range(len(workers)):
        assert items_equal(workers[index], alone[index])


def test_workers_raise_the_first_bad_records_error(model_dir, data):
    with pytest.raises(DataError) as alone:
        dataset(model_dir, data).validate()
    with pytest.raises(DataError) as in_workers:
        dataset(model_dir, data).validate(workers=2)
    assert re.search(r"record 'r3': field 'image'", str(alone.value))
    assert (str(in_workers.value), in_workers.value.reason) == (str(alone.value), alone.value.reason)


def _validate_as_rank(rank: int, world_size: int, store: str, model_dir: str, data: str, out: str,
                      options: dict) -> None:
    """One process of a distributed validate: writes what it encoded, kept and raised to out-<rank>.json."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        records, _ = load_records(data)
        encoded: list[str] = []
        checked = InstructionDataset(records, vlm.load(model_dir)[1], max_length=256, **options)
        encode = checked.encode
        checked.encode = lambda record: encoded.append(record.id) or encode(record)
        result: dict = {}
        try:
            result["report"] = checked.validate().counts
        except DataError as error:
            result["error"] = [str(error), error.reason]
        result.update(encoded=encoded, kept=[record.id for record in checked.records], lengths=checked.lengths)
        if checked._encoded is not None:
            result["kept_items"] = sorted(checked._encoded)
        with open(f"{out}-{rank}.json", "w") as file:
            json.dump(result, file)
    finally:
        dist.destroy_process_group()


def validate_in_two_processes(tmp_path, model_dir, data, **options) -> list[dict]:
    out = tmp_path / "rank"
    mp.spawn(_validate_as_rank, args=(2, str(tmp_path / "store"), str(model_dir), str(data), str(out), options),
             nprocs=2)
    return [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("keep_encoded", [False, True])
def test_distributed_processes_split_the_check_and_keep_the_same_records(model_dir, data, tmp_path, keep_encoded):
    alone = dataset(model_dir, data, skip_bad_records=True)
    report = alone.validate()
    ranks = validate_in_two_processes(tmp_path, model_dir, data, skip_bad_records=True, keep_encoded=keep_encoded)
    ids = [f"r{index}" for index in range(10)]
    for rank, result in enumerate(ranks):
        # Its share only; with keep_encoded every record, each kept item kept, as its sampler may draw any of them.
        assert result["encoded"] == (ids if keep_encoded else ids[rank::2])
        assert result["report"] == report.counts
        assert result["kept"] == [record.id for record in alone.records] and result["lengths"] == alone.lengths
        if keep_encoded:
            assert result["kept_items"] == list(range(len(alone)))


@pytest.mark.slow
def test_distributed_processes_raise_the_same_first_error(model_dir, data, tmp_path):
    records, _ = load_records(data)
    # The first bad record (r3) is rank 1's, so rank 0 can only learn of it from rank 1.
    with pytest.raises(DataError) as alone:
        dataset(model_dir, data).validate()
    ranks = validate_in_two_processes(tmp_path, model_dir, data)
    assert [result["error"] for result in ranks] == [[str(alone.value), alone.value.reason]] * 2
    assert ranks[0]["encoded"] == [record.id for record in records[0::2]]



def test_keep_encoded_stops_before_it_would_run_out_of_memory(model_dir, tmp_path, monkeypatch):
    import cmlora.data.dataset as dataset_module

    data = write_records(tmp_path / "data", count=40)
    records, _ = load_records(data, data.parent / "images")
    processor = vlm.load(model_dir)[1]
    one_item = dataset_module._item_bytes(InstructionDataset(records, processor).encode(records[0]))
    monkeypatch.setattr(dataset_module, "available_memory", lambda: 60 * one_item)  # 40 fit, 4 x 40 do not
    encoded = []
    encode = InstructionDataset.encode
    monkeypatch.setattr(InstructionDataset, "encode", lambda self, record: encoded.append(record.id) or
                        encode(self, record))
    InstructionDataset(records, processor, keep_encoded=True).validate()
    InstructionDataset(records, processor).validate()  # nothing kept: nothing to check
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes of this machine, each keeping every item
    InstructionDataset(records, processor).validate()
    encoded.clear()
    with pytest.raises(MemoryError, match=r"keep_encoded: keeping 40 encoded records in each of 4 processes needs "
                                          r"about .* GiB \(.* MiB each, measured on the first 32\), more than the "
                                          r".* GiB this machine has available. Set keep_encoded: false"):
        InstructionDataset(records, processor, keep_encoded=True).validate()
    assert len(encoded) == 32  # it stopped at the first 32, before keeping the rest


def test_available_memory_reads_this_machine():
    from cmlora.data.dataset import available_memory

    available = available_memory()
    if Path("/proc/meminfo").exists():
        assert available > 2**20
    else:
        assert available is None
