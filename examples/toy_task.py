"""The toy RL task shared by the examples: everything is built locally, nothing is downloaded.

* a word-level tokenizer trained with ``tokenizers`` on the task's own sentences and wrapped
  in ``transformers.PreTrainedTokenizerFast``;
* a tiny Llama (``LlamaConfig(hidden_size=64, ...)`` + ``AutoModelForCausalLM.from_config``),
  randomly initialised: it knows nothing at step 0;
* a verifiable reward: a prompt asks for a colour (``please say blue :``) and the reward is
  the fraction of the generated words that are that colour (1.0 = ``blue blue blue ...``).
  A random policy scores about 1/vocab; a trained one approaches 1.

Also: sampling, per-token log-probs, reading the example YAML configs.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
FILLER = ["please", "say", "tell", "me", "now", "the", "word", "colour", "again", "once", ":"]
PROMPT_TEMPLATES = ["please say {c} :", "say {c} now :", "tell me {c} :", "the word {c} :"]
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def limit_cpu_threads() -> None:
    """One intra-op thread unless OMP_NUM_THREADS says otherwise: the models here are so small
    that more threads only add synchronisation (several times slower on a busy machine)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


# ----------------------------------------------------------------------------- tokenizer
def build_tokenizer() -> Any:
    """Train a word-level tokenizer on the task's sentences; a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [t.format(c=c) + " " + " ".join([c] * 3) for t in PROMPT_TEMPLATES for c in COLORS]
    corpus += [" ".join(FILLER)]
    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL.values()), min_frequency=1)
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id(SPECIAL["bos_token"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


# ----------------------------------------------------------------------------- models
def build_policy(tokenizer: Any, model_cfg: Optional[dict] = None) -> torch.nn.Module:
    """A tiny randomly initialised Llama causal LM (seed torch first for a reproducible init)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(model_cfg or {})
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **cfg)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


class ValueModel(torch.nn.Module):
    """Critic: a Llama backbone with a scalar value head on every position."""

    def __init__(self, tokenizer: Any, model_cfg: Optional[dict] = None) -> None:
        super().__init__()
        lm = build_policy(tokenizer, model_cfg)
        self.backbone = lm.model
        self.value_head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids).last_hidden_state
        return self.value_head(hidden).squeeze(-1)


# ----------------------------------------------------------------------------- data + reward
class PromptDataset(torch.utils.data.Dataset):
    """``n`` prompts (token ids, all the same length) and the colour each one asks for."""

    def __init__(self, tokenizer: Any, n: int = 256) -> None:
        self.n = n
        self.prompts = []  # every (template, colour) pair once; item i is pair i % len(pairs)
        for template in PROMPT_TEMPLATES:
            for color in COLORS:
                ids = tokenizer(template.format(c=color))["input_ids"]
                self.prompts.append((torch.tensor(ids), tokenizer.convert_tokens_to_ids(color)))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.prompts[i % len(self.prompts)]


def reward_fn(responses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of the response tokens that are the requested colour: [B, T], [B] -> [B]."""
    return (responses == targets.unsqueeze(-1)).float().mean(-1)


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model: torch.nn.Module, prompts: torch.Tensor, length: int, temperature: float = 1.0) -> torch.Tensor:
    """Sample ``length`` tokens after each prompt (fixed length, no padding): [B, P] -> [B, T]."""
    seq = prompts
    for _ in range(length):
        logits = model(input_ids=seq).logits[:, -1, :].float() / temperature
        nxt = torch.multinomial(torch.softmax(logits, -1), 1)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompts.shape[1]:]


def token_logprobs(model: torch.nn.Module, prompts: torch.Tensor, responses: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """log pi(response token | prefix) of every response token: [B, T]."""
    seq = torch.cat([prompts, responses], dim=1)
    logits = model(input_ids=seq).logits[:, prompts.shape[1] - 1:-1, :].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------- config
def load_config(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def checkpoint_config(path: str, ckpt_path: Optional[str], export_path: Optional[str]) -> Any:
    """The SkyRL checkpoint keys of the YAML's ``trainer:`` section, with the CLI overrides."""
    import dataclasses

    from skyrl_callbacks import CheckpointConfig

    cfg = CheckpointConfig.from_yaml(path)
    changes = {}
    if ckpt_path:
        changes["ckpt_path"] = ckpt_path
        changes["export_path"] = export_path or ckpt_path.rstrip("/") + "_hf"
    elif export_path:
        changes["export_path"] = export_path
    return dataclasses.replace(cfg, **changes) if changes else cfg


def where(path: str) -> str:
    """An absolute path for local directories (URLs unchanged), for the messages."""
    return path if "://" in path else os.path.abspath(path)
