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

__all__ = ["Role", "DEFAULT_ROLE_ATTRS", "REF_ATTRS", "discover_roles", "assign_optimizers", "role_parameters",
           "clean_name"]

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
            module saved whole); relative to the role's keys (after ``include_prefix`` is stripped).
        include_prefix: makes the role a *view* on ``model``: ``model`` is a root module holding
            more than this role (Lightning's ``FSDPStrategy`` wraps the whole LightningModule in
            one FSDP1 root) and only its state-dict keys under this prefix (``"policy."``) belong
            to the role; the writers strip it when saving and add it back when loading, so a
            view's checkpoint has the same keys as one saved from the ``policy`` module itself.
            ``""`` is a view of the whole root; ``None`` (default) is not a view.
    """

    name: str
    model: "torch.nn.Module"
    optimizers: list = field(default_factory=list)
    schedulers: list = field(default_factory=list)
    tokenizer: Any = None
    exclude_prefixes: tuple = ()
    include_prefix: Optional[str] = None

    @property
    def is_view(self) -> bool:
        """True when the role is the part of ``model`` under :attr:`include_prefix`."""
        return self.include_prefix is not None

    @property
    def module(self) -> "torch.nn.Module":
        """The module of this role: ``model``, or for a view the submodule under
        :attr:`include_prefix` (FSDP1 forwards attribute lookups to the module it wraps)."""
        module = self.model
        for part in (self.include_prefix or "").rstrip(".").split("."):
            if part:
                module = getattr(module, part)
        return module

    def own_key(self, key: str) -> Optional[str]:
        """The role's name for a clean key of ``model`` (prefix stripped), or None when the key
        belongs to another role or is excluded."""
        prefix = self.include_prefix or ""
        if not key.startswith(prefix):
            return None
        key = key[len(prefix):]
        if self.exclude_prefixes and key.startswith(self.exclude_prefixes):
            return None
        return key

    def model_state_dict(self) -> dict:
        """The role's state dict, keyed as saved.

        For a view the keys come from ``named_parameters``/``named_buffers`` (wrapper prefixes
        such as ``_fsdp_wrapped_module.`` removed) and the values are this rank's local tensors:
        an FSDP1 root's ``state_dict()`` is a collective (it unshards), and callers such as the HF
        exporter ask for the keys on rank 0 only. The FSDP writer gathers full tensors itself.
        """
        if self.is_view:
            out = {}
            for name, tensor in _named_tensors(self.model):
                own = self.own_key(name)
                if own is not None:
                    out[own] = tensor
            return out
        sd = self.model.state_dict()
        if self.exclude_prefixes:
            sd = {k: v for k, v in sd.items() if not k.startswith(self.exclude_prefixes)}
        return sd


#: prefixes wrappers insert into parameter names (FSDP1, activation checkpointing, torch.compile)
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """``name`` without the prefixes wrappers insert (what ``state_dict`` keys look like)."""
    for p in WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def _named_tensors(module: "torch.nn.Module") -> list:
    """Clean names of every parameter (tied ones under each name) and buffer, in module order."""
    out = [(clean_name(n), p) for n, p in module.named_parameters(remove_duplicate=False)]
    out += [(clean_name(n), b) for n, b in module.named_buffers(remove_duplicate=False)]
    return out


def role_parameters(role: Role) -> list:
    """The parameters of ``role`` (for a view: the root's parameters under its prefix)."""
    if not role.is_view:
        return list(role.model.parameters())
    seen: set[int] = set()
    out = []
    for name, p in role.model.named_parameters():
        if role.own_key(clean_name(name)) is not None and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _param_ids(module: "torch.nn.Module") -> set[int]:
    return {id(p) for p in module.parameters()}


def _role_param_ids(role: Role) -> set[int]:
    return {id(p) for p in role_parameters(role)}


def discover_roles(
    module: "torch.nn.Module",
    role_attrs: Optional[Mapping[str, str]] = None,
    ref_attrs: Sequence[str] = REF_ATTRS,
    root: Optional["torch.nn.Module"] = None,
) -> list[Role]:
    """Find the roles of a training module.

    ``module.policy`` / ``module.critic`` (names overridable through ``role_attrs``) become
    roles; a module with neither is saved whole as ``policy`` (minus reference models).

    With ``root`` (a wrapper around ``module`` that owns its parameters, such as the FSDP1 root
    of Lightning's ``FSDPStrategy``), each role is a view on ``root``: ``Role(model=root,
    include_prefix="policy.")``, or ``include_prefix=""`` for a module saved whole.

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
        if root is None:
            roles.append(Role(name=name, model=sub))
        else:
            roles.append(Role(name=name, model=root, include_prefix=f"{attr}."))
    if not roles:
        prefixes = tuple(f"{a}." for a in ref_attrs if isinstance(getattr(module, a, None), torch.nn.Module))
        if root is None:
            roles.append(Role(name="policy", model=module, exclude_prefixes=prefixes))
        else:
            roles.append(Role(name="policy", model=root, exclude_prefixes=prefixes, include_prefix=""))
    return roles


def unassigned_parameters(module: "torch.nn.Module", roles: Iterable[Role], ref_attrs: Sequence[str] = REF_ATTRS) -> list[str]:
    """Names of trainable parameters of ``module`` that no role (and no reference model) holds."""
    import torch

    covered: set[int] = set()
    for role in roles:
        covered |= _role_param_ids(role)
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
    ids = {role.name: _role_param_ids(role) for role in roles}
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
