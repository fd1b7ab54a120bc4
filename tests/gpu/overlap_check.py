"""``async_overlap_copy`` on a GPU: the checkpoint holds the state of the save step, bit for bit, and the
steps after it are unchanged, while the device-to-host copy runs on a side stream during the next step.

One process, one GPU (``python tests/gpu/overlap_check.py``; ``--device cpu`` smoke-tests the script).
For each driver (a plain loop with ``CheckpointManager``'s optimizer step pre-hooks, and Lightning with
``SkyRLCheckpoint``, whose ``on_before_optimizer_step`` waits), two runs from the same initial weights
and batches:

* B (reference): no checkpointing; the state after step S is cloned to the host, the final state kept;
* A: ``async_save + async_overlap_copy``, a save at step S (and 2S, ...).

Checks (bitwise, ``[gpu] PASS|FAIL`` lines, appended to ``$GPU_RESULTS`` when set):

* ``overlap_<driver>_pending``: the deferred copy was still pending when ``save`` returned at some save
  (the overlap path ran; an INFO line instead when the copy always won the race);
* ``overlap_<driver>_ckpt``: the checkpoint of step S, loaded into a fresh model and optimizer, equals B's
  state after step S (weights and AdamW state);
* ``overlap_<driver>_after``: A's weights and optimizer state at the end equal B's (the optimizer steps after
  the save saw the right weights and did not race the copy);
* INFO: per save, the foreground stall and ``seconds_blocked`` (stall + the optimizer step's wait).

A negative control (``--control``) runs the plain loop with the pre-hooks off: the optimizer step then races
the copy and the checkpoint is expected to differ from step S (INFO only: a fast copy can win the race).

Deterministic: eager attention, ``torch.use_deterministic_algorithms``, ``CUBLAS_WORKSPACE_CONFIG``.
Model: Llama built from a config, default ~0.2B parameters on CUDA (2.4 GiB of weights + AdamW, so the copy
lasts longer than a forward/backward of the small batch and the optimizer step has to wait).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import diff, info, report  # noqa: E402

import torch  # noqa: E402


def build(args, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 256),
                      vocab_size=args.vocab, max_position_embeddings=max(128, args.seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    return model


def batches(args, n, device):
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(n)]


def host_state(model, opt) -> dict:
    sd = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    osd = opt.state_dict()
    sd["optimizer"] = {str(i): {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                       for i, st in osd["state"].items()}
    return sd


def step_fn(model, opt, ids, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def load_fresh(args, device, ckpt_path: str, step: int) -> dict:
    from skyrl_callbacks import CheckpointManager
    from skyrl_callbacks.roles import Role

    model = build(args, device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # not the saved weights: the load must replace every byte
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    mgr = CheckpointManager(dict(ckpt_path=ckpt_path, run_lock=False, preemption_signals=[]))
    mgr.load([Role(name="policy", model=model, optimizers=[opt])], mgr.step_dir(step))
    mgr.close()
    return host_state(model, opt)


def plain_run(args, device, data, ckpt_path=None, hooks=True, capture_step=None):
    """Train len(data) steps; with ckpt_path, overlap saves every args.every steps. Returns (final, captured, info)."""
    from skyrl_callbacks import CheckpointManager
    from skyrl_callbacks.roles import Role

    model = build(args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    mgr = None
    facts = {"pending": [], "blocked": [], "stall": []}
    if ckpt_path:
        mgr = CheckpointManager(dict(ckpt_path=ckpt_path, ckpt_interval=args.every, async_save=True,
                                     async_overlap_copy=True, run_lock=False, preemption_signals=[]))
        mgr.step_hooks = hooks
    roles = [Role(name="policy", model=model, optimizers=[opt])]
    captured = None
    for step, ids in enumerate(data, start=1):
        step_fn(model, opt, ids, device)
        if capture_step == step:
            captured = host_state(model, opt)
        if mgr is not None:
            done = mgr.poll()
            if done is not None:
                facts["blocked"].append(done.seconds_blocked)
            if mgr.should_save(step):
                t = time.perf_counter()
                res = mgr.save(step, roles)
                facts["stall"].append(time.perf_counter() - t)
                job = mgr._pending
                facts["pending"].append(bool(job is not None and job.copied is not None and not job.copied.is_set()))
    if mgr is not None:
        done = mgr.wait()
        if done is not None:
            facts["blocked"].append(done.seconds_blocked)
        mgr.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return host_state(model, opt), captured, facts


def lightning_run(args, device, data, ckpt_path=None, capture_step=None):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from skyrl_callbacks import SkyRLCheckpoint

    model = build(args, device)
    holder: dict = {}

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.policy = model

        def training_step(self, batch, batch_idx):
            return self.policy(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            holder["opt"] = torch.optim.AdamW(self.policy.parameters(), lr=args.lr, fused=device.type == "cuda")
            return holder["opt"]

    class Capture(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == capture_step:
                holder["captured"] = host_state(model, holder["opt"])

    rows = torch.cat([d.cpu() for d in data])
    loader = DataLoader(rows, batch_size=args.batch, shuffle=False)
    cbs = [Capture()]
    facts = {"pending": []}
    if ckpt_path:
        cb = SkyRLCheckpoint(dict(ckpt_path=ckpt_path, ckpt_interval=args.every, async_save=True,
                                  async_overlap_copy=True, run_lock=False, preemption_signals=[],
                                  save_on_train_end=False))
        real = cb._save

        def save_and_look(*a, **kw):
            out = real(*a, **kw)
            job = cb.manager._pending
            facts["pending"].append(bool(job is not None and job.copied is not None and not job.copied.is_set()))
            return out

        cb._save = save_and_look
        cbs.append(cb)
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                         precision="bf16-mixed" if device.type == "cuda" else "32-true", max_steps=len(data),
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=cbs, default_root_dir=ckpt_path or tempfile.gettempdir())
    trainer.fit(LM(), loader)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return host_state(model, holder["opt"]), holder.get("captured"), facts


def check(driver, args, device, work, run):
    steps = 2 * args.every + 1
    data = batches(args, steps, device)
    t = time.perf_counter()
    ref_final, ref_at, _ = run(args, device, data, ckpt_path=None, capture_step=args.every)
    t_ref = time.perf_counter() - t
    ckpt = os.path.join(work, driver)
    t = time.perf_counter()
    final, _, facts = run(args, device, data, ckpt_path=ckpt)
    info(f"{driver}: reference run {t_ref:.1f} s, overlap run {time.perf_counter() - t:.1f} s; facts {facts}")
    pend = facts["pending"]
    if any(pend):
        report(f"overlap_{driver}_pending", True, f"deferred copy still pending when save returned, per save: {pend}")
    else:
        info(f"overlap_{driver}_pending: the copy finished before save returned at every save ({pend}): the "
             "overlap was not exercised (a small state or a slow foreground); the bitwise checks still hold")
    got = load_fresh(args, device, ckpt, args.every)
    problems = diff(got, ref_at)
    report(f"overlap_{driver}_ckpt", not problems,
           "checkpoint of step %d bitwise equal to the state after step %d (%d model tensors, %d optimizer states)"
           % (args.every, args.every, len(got["model"]), len(got["optimizer"])) if not problems else "; ".join(problems[:6]))
    problems = diff(final, ref_final)
    report(f"overlap_{driver}_after", not problems,
           f"state after {steps} steps (saves at {args.every}, {2 * args.every}) bitwise equal to the run without saves"
           if not problems else "; ".join(problems[:6]))
    if driver == "plain" and facts.get("blocked"):
        info(f"plain: foreground stall {facts['stall']}, seconds_blocked (stall + optimizer-step wait) {facts['blocked']}")
    return ref_at


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--only", default="plain,lightning")
    p.add_argument("--control", action="store_true", help="also run the plain loop without the pre-hooks (INFO)")
    p.add_argument("--work", default=None)
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        report("overlap_cuda", False, "no CUDA device")
        sys.exit(1)
    args.layers = args.layers or (12 if cuda else 2)
    args.hidden = args.hidden or (1024 if cuda else 64)
    args.vocab = args.vocab or (32000 if cuda else 256)
    torch.use_deterministic_algorithms(True, warn_only=True)  # never raise: a warning names an op without one
    torch.backends.cudnn.benchmark = False
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    device = torch.device(args.device)
    work = tempfile.mkdtemp(prefix="skyrl-overlap-", dir=args.work)
    n = sum(x.numel() for x in build(args, "meta").parameters())
    info(f"overlap_check: {args.device}, {n / 1e6:.0f}M parameters ({n * 12 / 2**30:.2f} GiB of weights + AdamW), "
         f"batch {args.batch} x {args.seq}, saves every {args.every} steps")
    try:
        only = set(args.only.split(","))
        if "plain" in only:
            ref_at = check("plain", args, device, work, plain_run)
            if args.control:
                data = batches(args, args.every + 1, device)
                ckpt = os.path.join(work, "control")
                plain_run(args, device, data, ckpt_path=ckpt, hooks=False)
                got = load_fresh(args, device, ckpt, args.every)
                info(f"control (pre-hooks off): checkpoint differs from step {args.every}: {bool(diff(got, ref_at))} "
                     "(expected True when the copy outlasts the forward/backward)")
        if "lightning" in only:
            check("lightning", args, device, work, lightning_run)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
