"""Data-parallel loaders in two real processes (gloo), and their state resumed on one process."""

from __future__ import annotations

import itertools
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from data_fixtures import make_id_dataset, sample_ids_of_batch
from m2train.config import DataConfig
from m2train.data import build_dataloader

V, L, N_TRAIN, B, K = 512, 16, 96, 4, 5   # 96 samples / 2 ranks / micro batch 4 = 12 batches per rank
LAYOUT = "bert_doc"                        # masked LM, so the test also covers masking across ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(batches) -> dict:
    """sample id -> the (masked) input_ids row the model saw."""
    out = {}
    for b in batches:
        for i, row in zip(sample_ids_of_batch(b, LAYOUT, V), b["input_ids"]):
            out[i] = row.tolist()
    return out


def _ids(batches) -> list:
    return [i for b in batches for i in sample_ids_of_batch(b, LAYOUT, V)]


def _init(rank: int, world: int, local_world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % local_world),
                      LOCAL_WORLD_SIZE=str(local_world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _rank_main(rank: int, world: int, port: int, data: str, cache: str, out_dir: str) -> None:
    _init(rank, world, world, port)
    try:
        cfg = DataConfig(path=data, num_workers=0)
        # Pure data parallelism: each rank is its own data-parallel rank.
        ld = build_dataloader(cfg, "train", micro_batch_size=B, seed=0, dp_rank=rank, dp_world=world,
                              cache_dir=cache, drop_last=False)
        per_epoch = len(ld)
        first = list(itertools.islice(ld, K))
        state = ld.state_dict()
        rest = list(itertools.islice(ld, per_epoch - K))
        # Tensor parallel 2 / data parallel 1: both ranks must see the same batches.
        rep = build_dataloader(cfg, "train", micro_batch_size=B, seed=0, dp_rank=0, dp_world=1,
                               cache_dir=cache, drop_last=False)
        replicated = list(itertools.islice(rep, 6))
        result = {"per_epoch": per_epoch, "first": _ids(first), "rest": _ids(rest), "state": state,
                  "rows": _rows(first + rest), "replicated": _ids(replicated),
                  "replicated_rows": _rows(replicated)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes that import torch + streaming: ~20-60 s on 2 busy cores
def test_two_ranks_partition_and_resume_on_one(tmp_path):
    data = make_id_dataset(tmp_path / "data", LAYOUT, n_train=N_TRAIN, n_val=8, seq_len=L, vocab_size=V)
    mp.spawn(_rank_main, args=(2, _free_port(), str(data), str(tmp_path / "cache"), str(tmp_path)), nprocs=2,
             join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["per_epoch"] == r1["per_epoch"] == N_TRAIN // 2 // B

    # Disjoint, and together exactly the split.
    all0, all1 = r0["first"] + r0["rest"], r1["first"] + r1["rest"]
    assert len(set(all0)) == len(all0) == len(set(all1)) == len(all1) == N_TRAIN // 2
    assert not set(all0) & set(all1)
    assert sorted(all0 + all1) == list(range(N_TRAIN))
    assert r0["state"] == r1["state"]                    # one global position, whichever rank saves it
    assert r0["state"]["streaming"]["sample_in_epoch"] == 2 * K * B

    # The same run on one process: the first 2*K*B samples are the ones both ranks consumed in K steps
    # (order independent of rank count), and each sample is masked identically.
    cfg = DataConfig(path=str(data), num_workers=0)
    single = build_dataloader(cfg, "train", micro_batch_size=B, seed=0, cache_dir=tmp_path / "cache1",
                              drop_last=False)
    one = list(itertools.islice(single, N_TRAIN // B))
    one_ids = _ids(one)
    consumed = 2 * K * B
    assert set(one_ids[:consumed]) == set(r0["first"] + r1["first"])
    one_rows = _rows(one)
    for r in (r0, r1):
        for i, row in r["rows"].items():
            assert one_rows[int(i)] == row, f"sample {i} masked differently on 2 ranks"

    # Resume the 2-rank state on 1 rank: the rest of the epoch, nothing repeated or skipped.
    resumed = build_dataloader(cfg, "train", micro_batch_size=B, seed=0, cache_dir=tmp_path / "cache1",
                               drop_last=False)
    resumed.load_state_dict(r0["state"])
    rest = list(itertools.islice(resumed, (N_TRAIN - consumed) // B))
    rest_ids = _ids(rest)
    assert len(rest_ids) == len(set(rest_ids)) == N_TRAIN - consumed
    assert set(rest_ids) == set(range(N_TRAIN)) - set(r0["first"] + r1["first"])
    assert rest_ids == one_ids[consumed:]                # exactly where a 1-rank run would be
    assert _rows(rest) == {i: one_rows[i] for i in rest_ids}
    next_batch = next(resumed)                           # and then epoch 1 starts
    assert resumed.epoch == 1 and len(next_batch["input_ids"]) == B

    # Model-parallel replicas (dp_world=1 on 2 ranks) get identical batches, the same as one process.
    assert r0["replicated"] == r1["replicated"] == one_ids[:6 * B]
    assert r0["replicated_rows"] == r1["replicated_rows"]


@pytest.mark.parametrize("nodes,ranks_per_node", [(1, 2), (2, 1), (2, 2), (4, 2), (8, 1)])
def test_partition_order_does_not_depend_on_the_world(nodes, ranks_per_node):
    """The fact world.py relies on, checked on streaming's own partitioner (num_canonical_nodes=1, as
    build_dataloader fixes it): at every step the ranks together take the next B*W positions of one global
    order, so any world - and any resumption point saved by another world - continues that order."""
    from streaming.base.partition import get_partitions

    n, b, ncn = 480, 3, 1
    world = nodes * ranks_per_node

    def steps(p, r, drop_first=0, workers=1):
        parts = get_partitions("relaxed", n, ncn, p, r, workers, b, drop_first)
        # (nodes, ranks, workers, batches, batch) -> per global rank, its batches in the order torch's
        # DataLoader yields them (round-robin over workers)
        per_rank = parts.reshape(p * r, workers, -1, b).transpose(0, 2, 1, 3).reshape(p * r, -1, b)
        return [sorted(x for x in per_rank[:, t].ravel() if x >= 0) for t in range(per_rank.shape[1])]

    single = [i for step in steps(1, 1) for i in step]
    assert sorted(single) == list(range(n))
    for workers in (1, 2):
        multi = steps(nodes, ranks_per_node, workers=workers)
        for t, step in enumerate(multi):
            assert step == sorted(single[t * b * world:(t + 1) * b * world])
    # Resume on one process after k steps of this world, and this world after k steps of one process.
    k = 7
    resumed = [i for step in steps(1, 1, drop_first=k * b * world) for i in step]
    assert resumed == single[k * b * world:]
    again = steps(nodes, ranks_per_node, drop_first=k * b * world)
    assert len(again) == len(steps(nodes, ranks_per_node)) - k
    for t, step in enumerate(again):
        assert step == sorted(single[(k + t) * b * world:(k + t + 1) * b * world])


def _node_main(rank: int, world: int, port: int, data: str, cache: str, out_dir: str) -> None:
    _init(rank, world, 1, port)          # one rank per "node", both nodes on this host
    try:
        ld = build_dataloader(DataConfig(path=data, num_workers=1), "train", micro_batch_size=B, seed=0,
                              dp_rank=rank, dp_world=world, cache_dir=cache, drop_last=False)
        ids = _ids(itertools.islice(ld, len(ld)))
        Path(out_dir, f"node{rank}.json").write_text(json.dumps({"ids": ids, "state": ld.state_dict(),
                                                                 "local_dir": str(ld.local_dir)}))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes that import torch + streaming
def test_two_nodes_simulated_on_one_host(tmp_path):
    """LOCAL_WORLD_SIZE=1: two local leaders on one host, one shared cache root (streaming's /dev/shm prefix
    race and a shared decompression folder are what broke this before)."""
    data = make_id_dataset(tmp_path / "data", LAYOUT, n_train=N_TRAIN, n_val=8, seq_len=L, vocab_size=V)
    mp.spawn(_node_main, args=(2, _free_port(), str(data), str(tmp_path / "cache"), str(tmp_path)), nprocs=2,
             join=True)
    n0, n1 = (json.loads((tmp_path / f"node{r}.json").read_text()) for r in (0, 1))
    assert n0["local_dir"] != n1["local_dir"]
    assert not set(n0["ids"]) & set(n1["ids"]) and sorted(n0["ids"] + n1["ids"]) == list(range(N_TRAIN))
    assert n0["state"] == n1["state"] and n0["state"]["streaming"]["sample_in_epoch"] == N_TRAIN
