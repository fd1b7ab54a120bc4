"""Helpers of the megatron-core tests: CPU shims (tests only, never in the library), a tiny
Llama-shaped GPTModel, and ways to compare states across parallel layouts.

megatron-core assumes CUDA in a few places the checkpoint path touches:

* ``FileSystemWriterAsync.preload_tensors`` calls ``torch.cuda.synchronize()`` after staging;
* ``save_state_dict_async_finalize`` builds a flag tensor on ``torch.cuda.current_device()``;
* the rotary embedding moves ``inv_freq`` to ``torch.cuda.current_device()``;
* the tensor-parallel RNG tracker reads/writes the CUDA generator (``_get/_set_cuda_rng_state``).

:func:`install_cpu_shims` replaces exactly these with CPU equivalents (a no-op synchronize,
``current_device() == "cpu"``, a CPU ``torch.Generator`` standing in for the CUDA generator). It
does nothing when CUDA is available. Everything else (planning, validation, the fully parallel
save/load exchange over gloo, the forked writer processes, finalize) runs as it does on GPUs.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
FFN = 128
SEQ = 16

_FAKE_CUDA_GEN: Optional[torch.Generator] = None


def install_cpu_shims() -> None:
    """Narrow CUDA stand-ins so megatron-core's checkpoint path runs on a CPU-only torch."""
    global _FAKE_CUDA_GEN
    if torch.cuda.is_available():
        return
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    _FAKE_CUDA_GEN = torch.Generator().manual_seed(0)
    from megatron.core.tensor_parallel import random as mrandom

    def _get(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return _FAKE_CUDA_GEN.get_state()

    def _set(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        _FAKE_CUDA_GEN.set_state(new_state)

    mrandom._get_cuda_rng_state = _get
    mrandom._set_cuda_rng_state = _set


def install_cpu_load_exchange_shim() -> None:
    """For loads at DP > 1 on a CPU-only torch (tests only): megatron-core's fully parallel load
    exchanges the shards each DP rank read with its default ``"broadcast"`` algorithm, which moves
    them to CUDA (``.cuda()``, ``device="cuda"``). This makes ``FullyParallelLoadStrategyWrapper``
    use megatron-core's own ``"gather_object"`` algorithm instead (an ``all_gather_object`` of the
    loaded shards over the DP group, no CUDA). Which rank reads which shard is unchanged. Does
    nothing when CUDA is available. Not part of :func:`install_cpu_shims` (its tests never load at
    DP > 1)."""
    if torch.cuda.is_available():
        return
    from megatron.core.dist_checkpointing.strategies import fully_parallel

    cls = fully_parallel.FullyParallelLoadStrategyWrapper
    if getattr(cls, "_skyrl_cpu_exchange", False):
        return
    init = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.exchange_algo = "gather_object"

    cls.__init__ = __init__
    cls._skyrl_cpu_exchange = True


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_parallel(tp: int = 1, pp: int = 1, vpp: Optional[int] = None) -> None:
    from megatron.core import parallel_state as ps

    same = ps.model_parallel_is_initialized() and (
        ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size()) == (tp, pp, vpp)
    if not same:  # keep live groups (models/optimizers built on them) when the layout does not change
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     virtual_pipeline_model_parallel_size=vpp)
    seed_tp_tracker(1234 + ps.get_tensor_model_parallel_rank())  # as model_parallel_cuda_manual_seed does


def seed_tp_tracker(seed: int) -> dict:
    """Give megatron's tensor-parallel RNG tracker a state that differs on every rank (as
    ``model_parallel_cuda_manual_seed`` does per TP rank); returns a copy of it."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.random.get_cuda_rng_tracker()
    tracker.reset()
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tracker.set_states({"model-parallel-rng": torch.Generator().manual_seed(seed + 2718).get_state()})
    return {k: v.clone() for k, v in tracker.get_states().items()}


def tracker_states() -> dict:
    from megatron.core import tensor_parallel

    return {k: v.clone().cpu() for k, v in tensor_parallel.random.get_cuda_rng_tracker().get_states().items()}


def transformer_config(**overrides: Any):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=KV_HEADS,
        ffn_hidden_size=FFN, use_cpu_initialization=True, normalization="RMSNorm", gated_linear_unit=True,
        add_bias_linear=False, activation_func=torch.nn.functional.silu, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-5,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt(seed: int, vp_stage: Optional[int] = None, tie: bool = False, vocab_size: int = VOCAB, **overrides: Any):
    """A tiny Llama-shaped megatron-core GPTModel (RMSNorm, SwiGLU, RoPE, GQA, no bias), built on
    the CPU (``use_cpu_initialization``) and moved to the GPU when there is one. ``overrides`` go to
    the ``TransformerConfig`` (``hidden_size=...``, ``num_layers=...``, ``use_cpu_initialization=False``
    to initialise on the GPU); ``vocab_size`` sets the vocabulary (divisible by the TP size)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed)
    overrides.setdefault("tensor_model_parallel_size", ps.get_tensor_model_parallel_world_size())
    overrides.setdefault("pipeline_model_parallel_size", ps.get_pipeline_model_parallel_world_size())
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp:
        overrides.setdefault("virtual_pipeline_model_parallel_size", vpp)
    cfg = transformer_config(**overrides)
    model = GPTModel(
        cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=vocab_size, max_sequence_length=64,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=vpp is None, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=vpp is None, vp_stage=vp_stage),
        position_embedding_type="rope", share_embeddings_and_output_weights=tie, parallel_output=False,
        vp_stage=vp_stage,
    )
    return model.to(device())


def causal_mask(seq: int = SEQ) -> torch.Tensor:
    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device()), diagonal=1)


def batch(step: int, batch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5000 + step)
    ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g).to(device())
    pos = torch.arange(SEQ, device=device()).unsqueeze(0).expand(batch_size, -1)
    return ids, pos


def logits(model, step: int = 99) -> torch.Tensor:
    ids, pos = batch(step)
    with torch.no_grad():
        return model(ids, pos, attention_mask=causal_mask())


def make_role(model, lr: float = 1e-2):
    from skyrl_callbacks.roles import Role

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return Role(name="policy", model=model, optimizers=[opt], schedulers=[sched])


def train(role, steps: int, start: int = 0) -> None:
    """Real forward/backward steps (pipeline size 1): the same batch on every rank."""
    for step in range(start, start + steps):
        ids, pos = batch(step)
        out = role.model(ids, pos, attention_mask=causal_mask())
        out.float().pow(2).mean().backward()
        for opt in role.optimizers:
            opt.step()
            opt.zero_grad()
        for s in role.schedulers:
            s.step()


def fake_train(role, steps: int, seed: int) -> None:
    """Optimizer steps on seeded random gradients (for pipeline layouts, where a forward needs
    megatron's pipeline schedules)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in role.model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        for opt in role.optimizers:
            opt.step()
            opt.zero_grad()
        for s in role.schedulers:
            s.step()


def full_state(writer, role, dist, model_only: bool = False) -> dict:
    """Full (unsharded) model and optimizer tensors on rank 0, keyed by megatron's global keys
    (``decoder.layers.1.mlp.linear_fc1.weight``, ``optimizer.state.exp_avg.<key>``), assembled
    from the main replicas of every rank; plus the optimizer's common step and the scheduler."""
    from skyrl_callbacks.writers.megatron import _layout, gather_full_tensors

    if model_only:
        state = writer._model_state(role)
    else:
        state = writer._state(role, loading=False, sharding=writer.optimizer_sharding, layout=_layout(), with_rng=False)
    out = {}
    for key, full in gather_full_tensors(state, dist):
        if dist.is_main:
            out[key] = full
    if model_only:
        return out if dist.is_main else {}
    for i, opt in enumerate(role.optimizers):
        if isinstance(opt, torch.optim.Optimizer):
            steps = {float(s["step"]) for s in opt.state_dict()["state"].values() if "step" in s}
            out[f"optimizer{i}.step"] = sorted(steps)
    out["schedulers"] = [s.state_dict() for s in role.schedulers]
    return out if dist.is_main else {}


def diff(got: dict, ref: dict) -> list[str]:
    """Differences between two :func:`full_state` results (bitwise for tensors)."""
    problems = []
    for key in sorted(set(got) | set(ref)):
        if key not in got or key not in ref:
            problems.append(f"{key}: only in {'got' if key in got else 'ref'}")
            continue
        a, b = got[key], ref[key]
        if isinstance(a, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                delta = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else None
                problems.append(f"{key}: differs (shape {tuple(a.shape)} vs {tuple(b.shape)}, max |d|={delta})")
        elif a != b:
            problems.append(f"{key}: {str(a)[:80]} != {str(b)[:80]}")
    return problems


def files_on_disk(top: str) -> set[str]:
    out = set()
    for dirpath, _dirs, names in os.walk(top):
        for name in names:
            out.add(os.path.relpath(os.path.join(dirpath, name), top).replace(os.sep, "/"))
    return out


def run_example_on_cpu(path: str, argv: list) -> None:
    """Run a megatron example on CPU/gloo with the shims above (tests only), e.g.

        torchrun --nproc_per_node 2 tests/megatron_helpers.py examples/megatron_lightning.py \\
            --accelerator cpu --steps 8 --ckpt-interval 2 --ckpt-path /tmp/pl
    """
    import runpy
    import sys

    install_cpu_shims()
    from megatron.core import parallel_state as ps

    init = ps.initialize_model_parallel

    def init_and_seed(*args: Any, **kwargs: Any) -> None:
        init(*args, **kwargs)
        seed_tp_tracker(1234 + ps.get_tensor_model_parallel_rank())  # the CUDA seeding the example skips on CPU

    ps.initialize_model_parallel = init_and_seed
    sys.argv = [path] + list(argv)
    runpy.run_path(path, run_name="__main__")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run_example_on_cpu(sys.argv[1], sys.argv[2:])
