"""m2train.parallel.groups and .mpu: the TP / CP / DP split of a real 2-process gloo world (megatron-core
parallel_state) for tp=2, cp=2 and plain data parallel, the group ZeRO reduces over, what DeepSpeed's mpu
answers (checked with real all-reduces on each group), and layout errors."""

from __future__ import annotations

import pytest
import torch

from test_checkpoint_helpers import run_distributed


def _layouts(rank, world):
    import torch.distributed as dist

    from m2train.parallel import groups
    from m2train.parallel.mpu import build_mpu

    out = {}
    assert build_mpu() is None and groups.dp_size() == world      # before init: plain data parallel
    for tp, cp in ((1, 1), (2, 1), (1, 2)):
        groups.init_model_parallel(tp, cp)
        groups.init_model_parallel(tp, cp)                          # idempotent for the same layout
        mpu = build_mpu()
        # Real collectives on each group: the sum of global ranks names the members.
        sums = {}
        for name, g in (("tp", groups.tp_group()), ("cp", groups.cp_group()), ("dp", groups.dp_group()),
                        ("zero", groups.zero_group())):
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=g)
            sums[name] = t.item()
        mpu_answers = None if mpu is None else (
            mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank(),
            mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank(),
            mpu.get_data_parallel_group_ranks(), mpu.get_tensor_model_parallel_src_rank())
        out[(tp, cp)] = {
            "tp": (groups.tp_rank(), groups.tp_size()), "cp": (groups.cp_rank(), groups.cp_size()),
            "dp": (groups.dp_rank(), groups.dp_size()), "zero": (groups.zero_rank(), groups.zero_size()),
            "sums": sums, "layout": groups.layout(),
            "mpu": mpu_answers,
        }
        try:
            groups.init_model_parallel(2 if (tp, cp) == (1, 1) else 1, 1)
            out[(tp, cp)]["reinit_error"] = None
        except RuntimeError as e:
            out[(tp, cp)]["reinit_error"] = str(e)
        groups.destroy_model_parallel()
    return out


@pytest.mark.slow  # two spawned processes importing megatron-core + DeepSpeed: ~25 s on 2 cores
def test_groups_split_a_world_of_two():
    results = run_distributed(_layouts, 2)
    for rank, res in enumerate(results):
        # tp = cp = 1: plain data parallel over both ranks; no model-parallel peers.
        r = res[(1, 1)]
        assert r["tp"] == (0, 1) and r["cp"] == (0, 1) and r["dp"] == (rank, 2) and r["zero"] == (rank, 2)
        assert r["sums"] == {"tp": rank, "cp": rank, "dp": 1.0, "zero": 1.0}
        assert r["mpu"] is None
        # tp = 2: both ranks form one TP group; ZeRO has nothing to shard over (dp x cp = 1).
        r = res[(2, 1)]
        assert r["tp"] == (rank, 2) and r["cp"] == (0, 1) and r["dp"] == (0, 1) and r["zero"] == (0, 1)
        assert r["sums"] == {"tp": 1.0, "cp": rank, "dp": rank, "zero": rank}
        assert r["mpu"] == (2, rank, 1, 0, [rank], 0)
        assert r["layout"] == {"world_size": 2, "tensor_parallel": 2, "context_parallel": 1, "data_parallel": 1}
        assert "destroy_model_parallel" in r["reinit_error"]
        # cp = 2: one data-parallel replica (the loader's dp size is 1) but ZeRO reduces over dp x cp = 2,
        # because CP ranks hold the same parameters.
        r = res[(1, 2)]
        assert r["cp"] == (rank, 2) and r["dp"] == (0, 1) and r["tp"] == (0, 1) and r["zero"] == (rank, 2)
        assert r["sums"] == {"tp": rank, "cp": 1.0, "dp": rank, "zero": 1.0}
        assert r["mpu"] == (1, 0, 2, rank, [0, 1], rank)


def test_layout_errors_name_the_keys():
    from m2train.config import Config, ConfigError
    from m2train.parallel import check_parallel_config
    from m2train.parallel.groups import check_layout

    assert check_layout(8, 2, 2) == 2
    with pytest.raises(ConfigError, match=r"tensor_parallel=2 x parallel.context_parallel=3 = 6 .* world size 8"):
        check_layout(8, 2, 3)
    with pytest.raises(ConfigError, match="parallel.tensor_parallel: must be a positive integer"):
        check_layout(8, 0, 1)
    cfg = Config()
    cfg.parallel.tensor_parallel, cfg.parallel.context_parallel = 2, 2
    assert check_parallel_config(cfg, 8) == 2                   # TP and CP together: dp = 8 / (2 x 2)
    with pytest.raises(ConfigError, match=r"= 4 does not divide the world size 6"):
        check_parallel_config(cfg, 6)
    cfg.parallel.context_parallel, cfg.parallel.zero_stage = 1, 3
    with pytest.raises(ConfigError, match="zero_stage=3 with parallel.tensor_parallel"):
        check_parallel_config(cfg, 4)
    cfg.parallel.zero_stage = 1
    assert check_parallel_config(cfg, 4) == 2


def test_init_without_process_group_is_a_clear_error():
    import torch.distributed as dist

    from m2train.parallel import groups

    if dist.is_initialized():
        pytest.skip("a process group exists in this test process")
    with pytest.raises(RuntimeError, match="init_distributed"):
        groups.init_model_parallel(2, 1)
    # Without model-parallel groups every accessor answers for a world of one.
    assert (groups.tp_size(), groups.cp_size(), groups.dp_size(), groups.tp_rank(), groups.dp_rank()) == (1, 1, 1, 0, 0)
