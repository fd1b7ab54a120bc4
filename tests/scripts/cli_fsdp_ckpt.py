"""Write real FSDP2 checkpoints for tests/test_cli.py (2 ranks, CPU, gloo).

    python tests/scripts/cli_fsdp_ckpt.py WORKDIR [--nproc 2]

Trains a tiny Llama under FSDP2 (``fully_shard`` per decoder layer and on the root) and writes:

* ``WORKDIR/fsdp_ckpts/global_step_{1,2}``: committed checkpoints of :class:`CheckpointManager`
  (sharded DCP layout, ``max_ckpts_to_keep=2`` recorded in ``trainer_state.pt``);
* ``WORKDIR/native_ckpts/global_step_2``: the same step-2 state in SkyRL's native per-rank layout
  (``model_world_size_2_rank_R.pt`` ..., ``fsdp_config.json``, ``huggingface/``, ``trainer_state.pt``,
  ``data.pt``, no manifest), as SkyRL's ``FSDPStrategy.save_ckpt`` and trainer write it;
* ``WORKDIR/ref_fsdp.pt`` (rank 0): ``{"model": full state dict at step 2, "ids": input ids,
  "logits": the FSDP model's logits on them}``;
* ``WORKDIR/done_rank{R}.json`` when rank R finished.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import warnings
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)


def build_llama(seed: int):
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def train(role, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(2000 + step)
        ids = torch.randint(0, 128, (2, 16), generator=g)
        role.model(input_ids=ids, labels=ids).loss.backward()
        role.optimizers[0].step()
        role.optimizers[0].zero_grad()
        role.schedulers[0].step()


def write_native(step_dir: str, role, dist, data_state) -> None:
    """SkyRL's native FSDP2 layout: per-rank files, fsdp_config.json, huggingface/, trainer_state.pt."""
    from skyrl_callbacks.writers.hf import write_hf_metadata

    d = os.path.join(step_dir, "policy")
    W, r = dist.world_size, dist.rank
    if dist.is_main:
        os.makedirs(d, exist_ok=True)
    dist.barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(role.model.state_dict(), os.path.join(d, f"model_world_size_{W}_rank_{r}.pt"))
        torch.save(role.optimizers[0].state_dict(), os.path.join(d, f"optim_world_size_{W}_rank_{r}.pt"))
        extra = {"lr_scheduler": role.schedulers[0].state_dict(), "client_state": {}, "tag": None,
                 "fsdp_strategy": "fsdp2", "world_size": W, "rank": r, "global_step": 2,
                 "rng": {"cpu": torch.get_rng_state(), "random": random.getstate()}}
        torch.save(extra, os.path.join(d, f"extra_state_world_size_{W}_rank_{r}.pt"))
    if dist.is_main:
        with open(os.path.join(d, "fsdp_config.json"), "w") as fh:
            json.dump({"fsdp_strategy": "fsdp2", "world_size": W}, fh)
        write_hf_metadata(os.path.join(d, "huggingface"), role.model)
        torch.save(data_state, os.path.join(step_dir, "data.pt"))
        torch.save({"global_step": 2, "config": {"trainer": {"max_ckpts_to_keep": 3}}},
                   os.path.join(step_dir, "trainer_state.pt"))
        with open(os.path.join(os.path.dirname(step_dir), "latest_ckpt_global_step.txt"), "w") as fh:
            fh.write("2")
    dist.barrier()


def rank_main(rank: int, work: str, nproc: int, port: int) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc,
                             timeout=timedelta(seconds=90))
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from skyrl_callbacks import CheckpointConfig, CheckpointManager
        from skyrl_callbacks.dist import DistContext
        from skyrl_callbacks.roles import Role

        dist = DistContext()
        model = build_llama(0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        role = Role(name="policy", model=model, optimizers=[opt], schedulers=[sched])
        cfg = CheckpointConfig(ckpt_path=os.path.join(work, "fsdp_ckpts"), export_path=os.path.join(work, "exports"),
                               max_ckpts_to_keep=2)
        mgr = CheckpointManager(cfg, dist)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(role, 1)
            mgr.save(1, [role], trainer_state={"epoch": 0}, data_state={"epoch": 0, "batches_seen": 1, "rank": rank})
            train(role, 1, start=1)
            mgr.save(2, [role], trainer_state={"epoch": 0}, data_state={"epoch": 0, "batches_seen": 2, "rank": rank})
            write_native(os.path.join(work, "native_ckpts", "global_step_2"), role, dist,
                         {"epoch": 0, "batches_seen": 2})
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            ids = torch.arange(24).reshape(2, 12) % 128
            with torch.no_grad():
                logits = model(input_ids=ids).logits
        if rank == 0:
            torch.save({"model": full, "ids": ids, "logits": logits.detach().clone()}, os.path.join(work, "ref_fsdp.pt"))
        dist.barrier()
        with open(os.path.join(work, f"done_rank{rank}.json"), "w") as fh:
            json.dump({"ok": True}, fh)
    finally:
        tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp

    # import everything once, before forking: the ranks share it instead of importing it twice
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaConfig

    import skyrl_callbacks.manager  # noqa: F401
    import skyrl_callbacks.writers.fsdp  # noqa: F401
    import skyrl_callbacks.writers.hf  # noqa: F401

    AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))  # loads transformers' lazy modules

    os.makedirs(args.work, exist_ok=True)
    mp.start_processes(rank_main, args=(args.work, args.nproc, _free_port()), nprocs=args.nproc, join=True,
                       start_method="fork")
    return 0


if __name__ == "__main__":
    sys.exit(main())
