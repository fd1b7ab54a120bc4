"""Roles: which modules, optimizers and schedulers make up ``policy`` and ``critic``.

Optimizers belong to the role whose parameters they update, found by parameter identity
(not by position). One optimizer spanning several roles is saved once, under ``policy``.
Reference models (``ref``, ``ref_model``, ``reference``) are never saved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

from skyrl_callbacks.errors import ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["Role", "DEFAULT_ROLE_ATTRS", "REF_ATTRS", "discover_roles", "assign_optimizers"]

#: role name -> attribute name looked up on the training module
DEFAULT_ROLE_ATTRS = {"policy": "policy", "critic": "critic"}
#: attributes holding a frozen reference model; never saved
REF_ATTRS = ("ref", "ref_model", "reference")


@dataclass
class Role:
    """One saved model with its optimizers and LR schedulers.

    Attributes:
        name: ``"policy"`` or ``"critic"`` (the directory name under ``global_step_N``).
        model: the module whose ``state_dict`` is saved (possibly FSDP/DDP-wrapped).
        optimizers: optimizers updating this model's parameters.
        schedulers: LR schedulers of those optimizers.
        tokenizer: saved under ``huggingface/`` when given.
        exclude_prefixes: state-dict key prefixes left out (reference models inside a
            module saved whole).
    """

    name: str
    model: "torch.nn.Module"
    optimizers: list = field(default_factory=list)
    schedulers: list = field(default_factory=list)
    tokenizer: Any = None
    exclude_prefixes: tuple = ()

    def model_state_dict(self) -> dict:
        sd = self.model.state_dict()
        if self.exclude_prefixes:
            sd = {k: v for k, v in sd.items() if not k.startswith(self.exclude_prefixes)}
        return sd


def _param_ids(module: "torch.nn.Module") -> set[int]:
    return {id(p) for p in module.parameters()}


def discover_roles(
    module: "torch.nn.Module",
    role_attrs: Optional[Mapping[str, str]] = None,
    ref_attrs: Sequence[str] = REF_ATTRS,
) -> list[Role]:
    """Find the roles of a training module.

    ``module.policy`` / ``module.critic`` (names overridable through ``role_attrs``) become
    roles; a module with neither is saved whole as ``policy`` (minus reference models).

    Raises:
        ConfigError: a configured role attribute is missing or not an ``nn.Module``.
    """
    import torch

    attrs = dict(DEFAULT_ROLE_ATTRS if role_attrs is None else role_attrs)
    roles: list[Role] = []
    for name, attr in attrs.items():
        if attr is None:
            continue
        sub = getattr(module, attr, None)
        if sub is None:
            if role_attrs is not None and name in role_attrs and name != "critic":
                raise ConfigError(
                    f"roles: {name!r} maps to attribute {attr!r}, which {type(module).__name__} does not have. "
                    f"Set it on the module or fix the mapping."
                )
            continue
        if not isinstance(sub, torch.nn.Module):
            raise ConfigError(
                f"roles: attribute {attr!r} of {type(module).__name__} is a {type(sub).__name__}, "
                f"not a torch.nn.Module; map the role to a module attribute."
            )
        roles.append(Role(name=name, model=sub))
    if not roles:
        prefixes = tuple(f"{a}." for a in ref_attrs if isinstance(getattr(module, a, None), torch.nn.Module))
        roles.append(Role(name="policy", model=module, exclude_prefixes=prefixes))
    return roles


def unassigned_parameters(module: "torch.nn.Module", roles: Iterable[Role], ref_attrs: Sequence[str] = REF_ATTRS) -> list[str]:
    """Names of trainable parameters of ``module`` that no role (and no reference model) holds."""
    import torch

    covered: set[int] = set()
    for role in roles:
        covered |= _param_ids(role.model)
    for attr in ref_attrs:
        sub = getattr(module, attr, None)
        if isinstance(sub, torch.nn.Module):
            covered |= _param_ids(sub)
    return [n for n, p in module.named_parameters() if id(p) not in covered]


def assign_optimizers(roles: list[Role], optimizers: Sequence[Any], schedulers: Sequence[Any]) -> None:
    """Attach each optimizer (and its schedulers) to the role whose parameters it updates.

    An optimizer whose parameters all belong to one role goes to that role; one spanning
    several roles (or holding parameters of no role) goes to ``policy`` (the first role).
    """
    if not roles:
        return
    ids = {role.name: _param_ids(role.model) for role in roles}
    for role in roles:
        role.optimizers, role.schedulers = [], []
    owner_of: dict[int, Role] = {}
    for opt in optimizers:
        params = {id(p) for g in opt.param_groups for p in g["params"]}
        owners = [r for r in roles if params and params <= ids[r.name]]
        owner = owners[0] if len(owners) == 1 else roles[0]
        if len(owners) != 1:
            logger.debug("optimizer %s spans several roles; saved under %s", type(opt).__name__, owner.name)
        owner.optimizers.append(opt)
        owner_of[id(opt)] = owner
    for sched in schedulers:
        opt = getattr(sched, "optimizer", None)
        owner = owner_of.get(id(opt), roles[0])
        owner.schedulers.append(sched)
