"""PPO fine-tuning of a tiny causal LM with PyTorch Lightning, checkpointed the SkyRL way.

    python examples/ppo_lightning.py                   # about 45 s on a laptop CPU
    # kill it (Ctrl-C, or kill -9) and run the same command again: it continues
    # from the last checkpoint and says so
    python examples/ppo_lightning.py --devices 2       # DDP over 2 GPUs (or 2 CPU processes)

Policy, critic (a value head on its own Llama backbone) and a frozen reference model. Each
step samples one response per prompt, scores it with the verifiable reward, subtracts a
per-token KL penalty to the reference, computes GAE advantages with the critic, and runs PPO
epochs of clipped policy and value updates, with manual optimization (a policy optimizer and
a critic optimizer, each with an LR scheduler). The task (examples/toy_task.py): say the
colour the prompt asks for; the reward rises from ~0.05 (random) to ~0.9+.

Checkpointing is one line: ``Trainer(callbacks=[SkyRLCheckpoint(cfg)])``. It saves every
``ckpt_interval`` steps in SkyRL's layout (``global_step_N/policy``, ``.../critic``, no
reference model, ``data.pt``, ``trainer_state.pt``), exports the policy in HF format every
``hf_save_interval`` steps, and resumes by itself inside ``trainer.fit``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy_task  # noqa: E402  (the examples' shared task, next to this file)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "ppo_lightning.yaml")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="total training steps (default: trainer.total_steps)")
    p.add_argument("--ckpt-path", default=None,
                   help="checkpoint directory or URL (default: trainer.ckpt_path); exports then go to <ckpt-path>_hf")
    p.add_argument("--export-path", default=None, help="HF export directory or URL (default: trainer.export_path)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto (default: %(default)s)")
    p.add_argument("--devices", type=int, default=1, help="devices (processes) for DDP (default: %(default)s)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    toy_task.limit_cpu_threads()
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import TQDMProgressBar

    from skyrl_callbacks import ResumableDataLoader, SkyRLCheckpoint

    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the frozen reference model
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")

    cfg = toy_task.load_config(args.config)
    trainer_cfg = cfg.get("trainer", {})
    total_steps = args.steps if args.steps is not None else int(trainer_cfg.get("total_steps", 120))
    ckpt_cfg = toy_task.checkpoint_config(args.config, args.ckpt_path, args.export_path)

    class PPOModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = toy_task.build_tokenizer()  # saved under policy/huggingface/ and in exports
            self.policy = toy_task.build_policy(self.tokenizer, cfg.get("model"))
            self.ref = copy.deepcopy(self.policy).requires_grad_(False).eval()  # frozen: never saved
            self.critic = toy_task.ValueModel(self.tokenizer, cfg.get("model"))
            self.automatic_optimization = False  # a policy and a critic optimizer
            self.algo = trainer_cfg.get("algorithm", {})
            sampling = cfg.get("generator", {}).get("sampling_params", {})
            self.gen_len = int(sampling.get("max_generate_length", 6))
            self.temperature = float(sampling.get("temperature", 1.0))
            self.rewards: list[float] = []  # mean reward per step, kept in the checkpoint

        # -------------------------------------------------------------- one PPO iteration
        def training_step(self, batch, batch_idx):
            prompts, targets = batch
            algo, temp, n_prompt = self.algo, self.temperature, prompts.shape[1]
            # ---- rollout and scoring
            self.policy.eval()
            responses = toy_task.sample(self.policy, prompts, self.gen_len, temp)
            score = toy_task.reward_fn(responses, targets)
            seq = torch.cat([prompts, responses], 1)
            with torch.no_grad():
                old_logp = toy_task.token_logprobs(self.policy, prompts, responses, temp)
                ref_logp = toy_task.token_logprobs(self.ref, prompts, responses, temp)
                old_values = self.critic(seq)[:, n_prompt - 1:-1]
                kl = old_logp - ref_logp
                rewards = -float(algo.get("kl_coef", 0.02)) * kl if algo.get("use_kl_in_reward", True) else torch.zeros_like(kl)
                rewards[:, -1] += score  # the verifiable reward arrives with the last token
                adv, returns = gae(rewards, old_values, float(algo.get("gamma", 1.0)), float(algo.get("lambd", 1.0)))
                adv = (adv - adv.mean()) / (adv.std() + 1e-6)
            # ---- PPO epochs: clipped surrogate for the policy, clipped value loss for the critic
            self.policy.train()
            opt_p, opt_c = self.optimizers()
            sched_p, sched_c = self.lr_schedulers()
            clip_lo, clip_hi = float(algo.get("eps_clip_low", 0.2)), float(algo.get("eps_clip_high", 0.2))
            v_clip = float(algo.get("value_clip", 0.2))
            for _ in range(int(trainer_cfg.get("update_epochs_per_batch", 2))):
                logp = toy_task.token_logprobs(self.policy, prompts, responses, temp)
                ratio = torch.exp(logp - old_logp)
                pg_loss = -torch.min(ratio * adv, ratio.clamp(1 - clip_lo, 1 + clip_hi) * adv).mean()
                values = self.critic(seq)[:, n_prompt - 1:-1]
                clipped = old_values + (values - old_values).clamp(-v_clip, v_clip)
                v_loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2).mean()
                opt_p.zero_grad()
                opt_c.zero_grad()
                self.manual_backward(pg_loss + v_loss)  # disjoint parameters: one backward (DDP-friendly)
                self.clip_gradients(opt_p, gradient_clip_val=self._max_norm("policy"), gradient_clip_algorithm="norm")
                self.clip_gradients(opt_c, gradient_clip_val=self._max_norm("critic"), gradient_clip_algorithm="norm")
                opt_p.step()
                opt_c.step()
            sched_p.step()
            sched_c.step()
            # ---- report
            mean_reward = self.all_gather(score.mean()).mean().item()
            self.rewards.append(mean_reward)
            self.log_dict({"reward": mean_reward, "kl": kl.sum(-1).mean().item()}, prog_bar=True, on_step=True)
            step = len(self.rewards)
            log_every = int(trainer_cfg.get("log_every", 10))
            if step % log_every == 0 or step == total_steps:
                window = self.rewards[-log_every:]
                self.print(f"step {step:4d}/{total_steps} | reward {sum(window) / len(window):.3f} | "
                           f"kl {kl.sum(-1).mean().item():.4f} | value loss {v_loss.item():.4f}")

        def _max_norm(self, role: str) -> float:
            return float(trainer_cfg.get(role, {}).get("optimizer_config", {}).get("max_grad_norm", 1.0))

        def configure_optimizers(self):
            out = []
            for role, module in (("policy", self.policy), ("critic", self.critic)):
                oc = trainer_cfg.get(role, {}).get("optimizer_config", {})
                opt = torch.optim.AdamW(module.parameters(), lr=float(oc.get("lr", 5e-3)),
                                        weight_decay=float(oc.get("weight_decay", 0.0)))
                warmup = max(int(oc.get("num_warmup_steps", 5)), 1)
                out.append((opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s, w=warmup: min(1.0, (s + 1) / w))))
            return [o for o, _ in out], [s for _, s in out]

        # the reward curve survives a resume: SkyRLCheckpoint keeps what these hooks put in
        def on_save_checkpoint(self, checkpoint: dict) -> None:
            checkpoint["reward_history"] = list(self.rewards)

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            self.rewards = list(checkpoint.get("reward_history", []))

    class StepProgressBar(TQDMProgressBar):
        """Lightning's tqdm bar, counting training iterations over the whole run (with manual
        optimization Lightning's own count is optimizer steps, restarted every epoch)."""

        def _sync(self, pl_module: pl.LightningModule) -> None:
            bar = self.train_progress_bar
            if bar is not None and not bar.disable:
                bar.total = total_steps
                bar.set_description("PPO")
                bar.n = min(len(pl_module.rewards), total_steps)
                bar.refresh()

        def on_train_start(self, trainer, pl_module) -> None:
            super().on_train_start(trainer, pl_module)
            self._sync(pl_module)

        def on_train_epoch_start(self, trainer, *_) -> None:
            self._sync(trainer.lightning_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._sync(pl_module)
            if self.train_progress_bar is not None and not self.train_progress_bar.disable:
                self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        adv = torch.zeros_like(rewards)
        last = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            last = delta + gamma * lam * last
            adv[:, t] = last
        return adv, adv + values

    pl.seed_everything(int(trainer_cfg.get("seed", 42)), verbose=False)  # same init every (re)run: ref is rebuilt
    module = PPOModule()
    loader = ResumableDataLoader(toy_task.PromptDataset(module.tokenizer),
                                 batch_size=int(trainer_cfg.get("train_batch_size", 64)), shuffle=True)
    ckpt = SkyRLCheckpoint(ckpt_cfg)
    updates = int(trainer_cfg.get("update_epochs_per_batch", 2))
    trainer = pl.Trainer(
        # manual optimization: Lightning counts every optimizer.step() (2 optimizers x PPO epochs);
        # SkyRLCheckpoint counts training iterations, as SkyRL does
        max_steps=total_steps * 2 * updates,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        callbacks=[ckpt, StepProgressBar()],
        logger=False,
        enable_checkpointing=False,  # SkyRLCheckpoint does the checkpointing
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if trainer.is_global_zero:
        print(f"PPO for {total_steps} steps; checkpoints every {ckpt_cfg.ckpt_interval} steps -> "
              f"{toy_task.where(ckpt_cfg.ckpt_path)} (an earlier run there is resumed)")
    trainer.fit(module, loader)

    if trainer.is_global_zero:
        rewards = module.rewards
        if rewards:
            first, last = rewards[:10], rewards[-10:]
            print(f"\nreward: {sum(first) / len(first):.3f} (first 10 steps) -> {sum(last) / len(last):.3f} (last 10 steps)")
        if ckpt.resumed_step is not None and ckpt.resumed_step >= total_steps:
            print(f"already at step {ckpt.resumed_step} of {total_steps}: nothing to train (pass --steps N to go further)")
        print(f"checkpoints: {toy_task.where(ckpt_cfg.ckpt_path)} (latest: global_step_{ckpt.manager.read_pointer()})")
        if ckpt_cfg.hf_save_interval > 0:
            print(f"HF exports:  {toy_task.where(ckpt_cfg.export_path)}/global_step_<N>/policy "
                  f"(AutoModelForCausalLM.from_pretrained(...) loads them)")
        print("Run the same command again to continue from the latest checkpoint (raise --steps to train "
              "further); set resume_mode: none or delete the directory to start over.")


if __name__ == "__main__":
    main()
