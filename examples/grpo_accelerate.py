"""GRPO fine-tuning of a tiny causal LM in a hand-written Accelerate loop, checkpointed the SkyRL way.

    python examples/grpo_accelerate.py                 # about 30 s on a laptop CPU
    # kill it (Ctrl-C, or kill -9) and run the same command again: it continues
    # from the last checkpoint and says so
    torchrun --nproc_per_node 2 examples/grpo_accelerate.py   # several processes / GPUs

Policy + frozen reference model, no critic: for every prompt a group of responses is
sampled, each response's advantage is its reward relative to its group (GRPO), and the
policy takes clipped policy-gradient steps with a KL penalty to the reference. The task
(examples/toy_task.py): say the colour the prompt asks for; the reward rises from ~0.05
(random) to ~0.9+.

Checkpointing is three calls of ``SkyRLCheckpoint``: ``bind`` (resume) before the loop,
``step()`` after every iteration (saves every ``ckpt_interval`` steps and exports HF weights
every ``hf_save_interval`` steps), ``finish()`` at the end. The layout is SkyRL's:
``{ckpt_path}/global_step_N/policy/...``, ``data.pt``, ``trainer_state.pt`` and
``latest_ckpt_global_step.txt``; exports go to ``{export_path}/global_step_N/policy/``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy_task  # noqa: E402  (the examples' shared task, next to this file)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "grpo_accelerate.yaml")


class RewardHistory:
    """Mean reward of every step; saved in the checkpoint (``bind(extra_state=...)``)."""

    def __init__(self) -> None:
        self.rewards: list[float] = []

    def state_dict(self) -> dict:
        return {"rewards": list(self.rewards)}

    def load_state_dict(self, state: dict) -> None:
        self.rewards = list(state["rewards"])

    def window(self, first: bool, n: int = 10) -> float:
        vals = self.rewards[:n] if first else self.rewards[-n:]
        return sum(vals) / max(len(vals), 1)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="total training steps (default: trainer.total_steps)")
    p.add_argument("--ckpt-path", default=None,
                   help="checkpoint directory or URL (default: trainer.ckpt_path); exports then go to <ckpt-path>_hf")
    p.add_argument("--export-path", default=None, help="HF export directory or URL (default: trainer.export_path)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    toy_task.limit_cpu_threads()
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from skyrl_callbacks import SkyRLCheckpoint

    cfg = toy_task.load_config(args.config)
    trainer_cfg = cfg.get("trainer", {})
    algo = trainer_cfg.get("algorithm", {})
    optim_cfg = trainer_cfg.get("policy", {}).get("optimizer_config", {})
    gen_cfg = cfg.get("generator", {})
    sampling = gen_cfg.get("sampling_params", {})
    total_steps = args.steps if args.steps is not None else int(trainer_cfg.get("total_steps", 120))
    group = int(gen_cfg.get("n_samples_per_prompt", 4))
    gen_len = int(sampling.get("max_generate_length", 6))
    temperature = float(sampling.get("temperature", 1.0))
    clip_lo, clip_hi = float(algo.get("eps_clip_low", 0.2)), float(algo.get("eps_clip_high", 0.2))
    kl_coef = float(algo.get("kl_loss_coef", 0.02)) if algo.get("use_kl_loss", True) else 0.0
    log_every = int(trainer_cfg.get("log_every", 10))
    ckpt_cfg = toy_task.checkpoint_config(args.config, args.ckpt_path, args.export_path)

    # without GPUs, cpu=True makes torchrun's processes one gloo process group (else each runs alone)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    set_seed(int(trainer_cfg.get("seed", 42)))  # same initial weights in every (re)run: the reference is rebuilt
    say = accelerator.print

    tokenizer = toy_task.build_tokenizer()
    policy = toy_task.build_policy(tokenizer, cfg.get("model"))
    ref = copy.deepcopy(policy).requires_grad_(False).eval()  # frozen reference: never saved
    dataset = toy_task.PromptDataset(tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(trainer_cfg.get("train_batch_size", 16)), shuffle=True)
    opt = torch.optim.AdamW(policy.parameters(), lr=float(optim_cfg.get("lr", 5e-3)),
                            weight_decay=float(optim_cfg.get("weight_decay", 0.0)))
    warmup = int(optim_cfg.get("num_warmup_steps", 5))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    policy, opt, sched, loader = accelerator.prepare(policy, opt, sched, loader)
    ref = ref.to(accelerator.device)

    history = RewardHistory()
    ckpt = SkyRLCheckpoint(ckpt_cfg)
    state = ckpt.bind(accelerator, policy=policy, ref=ref, optimizers=opt, schedulers=sched, dataloader=loader,
                      tokenizer=tokenizer, extra_state={"reward_history": history})
    if not state.resumed:
        say(f"starting a fresh run: {total_steps} steps, checkpoints every {ckpt_cfg.ckpt_interval} steps "
            f"-> {toy_task.where(ckpt_cfg.ckpt_path)}")
    elif state.step >= total_steps:
        say(f"already at step {state.step} of {total_steps}: nothing to train (pass --steps N to go further)")

    unwrapped = accelerator.unwrap_model(policy)
    batches = state.batches()  # endless; after a resume it continues the interrupted epoch
    bar = tqdm(total=total_steps, initial=min(state.step, total_steps), desc="grpo", unit="step",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for step in range(state.step + 1, total_steps + 1):
        prompts, targets = next(batches)
        prompts, targets = prompts.repeat_interleave(group, 0), targets.repeat_interleave(group, 0)
        # ---- rollout: a group of responses per prompt, rewards, group-relative advantages
        unwrapped.eval()
        responses = toy_task.sample(unwrapped, prompts, gen_len, temperature)
        rewards = toy_task.reward_fn(responses, targets)
        grouped = rewards.view(-1, group)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        with torch.no_grad():
            old_logp = toy_task.token_logprobs(unwrapped, prompts, responses, temperature)
            ref_logp = toy_task.token_logprobs(ref, prompts, responses, temperature)
        # ---- policy update: clipped surrogate + KL(pi || ref) (k3 estimator)
        unwrapped.train()
        for _ in range(int(trainer_cfg.get("update_epochs_per_batch", 2))):
            logp = toy_task.token_logprobs(policy, prompts, responses, temperature)
            ratio = torch.exp(logp - old_logp)
            pg_loss = -torch.min(ratio * adv, ratio.clamp(1 - clip_lo, 1 + clip_hi) * adv).mean()
            log_r = ref_logp - logp
            kl = (torch.exp(log_r) - log_r - 1).mean()
            accelerator.backward(pg_loss + kl_coef * kl)
            accelerator.clip_grad_norm_(policy.parameters(), float(optim_cfg.get("max_grad_norm", 1.0)))
            opt.step()
            opt.zero_grad()
        sched.step()

        mean_reward = accelerator.gather(rewards).mean().item()
        history.rewards.append(mean_reward)
        bar.update(1)
        bar.set_postfix(reward=f"{mean_reward:.3f}", kl=f"{kl.item():.4f}")
        if step % log_every == 0 or step == total_steps:
            msg = f"step {step:4d}/{total_steps} | reward {history.window(False, log_every):.3f} | kl {kl.item():.4f}"
            if accelerator.is_main_process:
                bar.write(msg)
        ckpt.step()  # saves every ckpt_interval steps, exports every hf_save_interval steps
    ckpt.finish()  # the last step, if it was not saved yet
    bar.close()

    if accelerator.is_main_process and history.rewards:
        print(f"\nreward: {history.window(True):.3f} (first 10 steps) -> {history.window(False):.3f} (last 10 steps)")
        print(f"checkpoints: {toy_task.where(ckpt_cfg.ckpt_path)} (latest: global_step_{ckpt.manager.read_pointer()})")
        if ckpt_cfg.hf_save_interval > 0:
            print(f"HF exports:  {toy_task.where(ckpt_cfg.export_path)}/global_step_<N>/policy "
                  f"(AutoModelForCausalLM.from_pretrained(...) loads them)")
        print("Run the same command again to continue from the latest checkpoint (raise --steps to train "
              "further); set resume_mode: none or delete the directory to start over.")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
