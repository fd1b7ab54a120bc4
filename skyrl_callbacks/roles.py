"""Roles: which modules, optimizers and schedulers make up ``policy`` and ``critic``.

One framework-neutral implementation, used by the Lightning callback (attributes of the
LightningModule) and by :func:`skyrl_callbacks.integrations.accelerate.bind` (its keywords):

============  ==================================================================================
role          attribute (Lightning) / keyword (``bind``)
============  ==================================================================================
``policy``    ``policy``, ``actor``, ``actor_model``, ``policy_model``; ``model`` when it is the
              only trainable module left (``bind``: ``model=`` always)
``critic``    ``critic``, ``value_model``, ``value_net``, ``value_head``
not saved     ``ref``, ``ref_model``, ``reference``, ``reward_model``, ``rm``; any other module
              whose parameters are all frozen (its buffers are kept in ``trainer_state.pt``)
============  ==================================================================================

Two candidates for one role are refused (:class:`~skyrl_callbacks.ConfigError` naming both
and the ``roles=`` mapping that settles it). Optimizers belong to the role whose parameters
they update, found by parameter identity (not by position); see :func:`assign_optimizers`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from skyrl_callbacks.errors import ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["Role", "DEFAULT_ROLE_ATTRS", "ROLE_ALIASES", "REF_ATTRS", "RoleChoice", "OptimizerAssignment",
           "choose_roles", "discover_roles", "assign_optimizers", "role_parameters", "clean_name", "describe_roles"]

#: role name -> attribute name looked up on the training module (the first alias of each role)
DEFAULT_ROLE_ATTRS = {"policy": "policy", "critic": "critic"}
#: role name -> the attribute names (Lightning) / ``bind`` keywords that are that role
ROLE_ALIASES = {
    "policy": ("policy", "actor", "actor_model", "policy_model"),
    "critic": ("critic", "value_model", "value_net", "value_head"),
}
#: the policy when it is the only trainable module not already in a role
SOLE_POLICY_ATTR = "model"
#: attributes holding a reference or reward model; never saved
REF_ATTRS = ("ref", "ref_model", "reference", "reward_model", "rm")
_REWARD_ATTRS = ("reward_model", "rm")


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


def _is_frozen(module: "torch.nn.Module") -> bool:
    """True when ``module`` has parameters and none of them requires grad."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def _is_trainable(module: "torch.nn.Module") -> bool:
    return any(p.requires_grad for p in module.parameters())


def _contains(outer: "torch.nn.Module", inner: "torch.nn.Module") -> bool:
    return any(m is inner for m in outer.modules())


# --------------------------------------------------------------------------- choosing the roles
@dataclass
class RoleChoice:
    """Which attributes (Lightning) / keywords (``bind``) are which role, decided once per run.

    Attributes:
        attrs: role name -> attribute path (``"actor"``, ``"agent.actor"``); ``""`` is the
            whole module (nothing matched a role name).
        not_saved: attribute -> why it is not saved (``"reference model"``, ``"frozen"``...).
        excluded: attributes whose state is never saved (reference and reward models).
        frozen: attributes left out because their parameters are frozen (their buffers are
            kept in ``trainer_state.pt``, so a frozen BatchNorm's statistics still resume).
        unowned: trainable parameters (clean names) outside every role, reference and frozen
            module; they are kept in ``trainer_state.pt``.
    """

    attrs: dict = field(default_factory=dict)
    not_saved: dict = field(default_factory=dict)
    excluded: tuple = ()
    frozen: tuple = ()
    unowned: list = field(default_factory=list)

    def role_prefixes(self) -> tuple:
        """State-dict key prefixes of the roles (empty when a role is the whole module)."""
        return tuple(f"{a}." for a in self.attrs.values() if a)

    def unsaved_prefixes(self) -> tuple:
        """Key prefixes never saved as a role nor with the module's other state."""
        return tuple(f"{a}." for a in self.excluded)

    def unowned_attrs(self) -> list:
        """The top-level attributes holding :attr:`unowned` parameters."""
        return sorted({n.split(".", 1)[0] for n in self.unowned})


def _lookup(module: Any, path: str) -> Any:
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def choose_roles(
    candidates: Mapping[str, Any],
    explicit: Optional[Mapping[str, Optional[str]]] = None,
    ref_attrs: Sequence[str] = REF_ATTRS,
    *,
    lookup: Optional[Callable[[str], Any]] = None,
    label: Callable[[str], str] = lambda a: f"module.{a}",
    fix: Optional[Callable[[str, Sequence[str]], str]] = None,
    sole_model: bool = True,
    owner: str = "the module",
) -> RoleChoice:
    """Decide which candidate is which role (see the module docstring for the table).

    Args:
        candidates: name -> object, in order: the training module's attributes (its
            ``named_children()``) or ``bind``'s keywords. Objects that are not modules are ignored.
        explicit: role -> attribute path given by the user (``roles=``); ``None`` turns a role
            off. Roles not named here are still discovered among the other candidates.
        ref_attrs: names of reference/reward models (never saved).
        lookup: resolves an explicit attribute path (default: ``candidates``, dotted paths not
            supported).
        label, fix: wording of messages (``module.actor`` / ``roles=`` for Lightning,
            ``actor=`` for ``bind``).
        sole_model: ``model`` is the policy only when it is the only trainable module left
            (Lightning); ``bind`` passes False: there ``model=`` is an explicit policy keyword.

    Raises:
        ConfigError: an explicit attribute is missing or not a module; two candidates for one
            role; a critic but no policy while trainable modules are left outside every role.
    """
    import torch

    explicit = dict(explicit or {})
    lookup = lookup or (lambda a: candidates.get(a))
    fix = fix or _roles_fix
    modules = {n: m for n, m in candidates.items() if isinstance(m, torch.nn.Module)}
    choice = RoleChoice()
    taken: list = []  # modules already in a role

    for role, attr in explicit.items():
        if attr is None:
            continue
        sub = lookup(attr)
        if sub is None:
            raise ConfigError(
                f"roles: {role!r} maps to attribute {attr!r}, which {owner} does not have "
                f"(its modules: {', '.join(modules) or 'none'}). Set it on the module or fix the mapping."
            )
        if not isinstance(sub, torch.nn.Module):
            raise ConfigError(
                f"roles: attribute {attr!r} of {owner} is a {type(sub).__name__}, "
                f"not a torch.nn.Module; map the role to a module attribute."
            )
        choice.attrs[role] = attr
        taken.append(sub)

    refs = [n for n in modules if n in ref_attrs and not any(t is modules[n] for t in taken)]

    def free(name: str) -> bool:
        m = modules[name]
        return name not in refs and not any(t is m or _contains(t, m) for t in taken)

    for role, aliases in ROLE_ALIASES.items():
        if role in explicit:
            continue
        found = [n for n in aliases if n in modules and free(n)]
        # the same module under two names, or one inside the other, is one candidate
        distinct: list = []
        for n in found:
            if any(modules[d] is modules[n] or _contains(modules[d], modules[n]) for d in distinct):
                continue
            distinct = [d for d in distinct if not _contains(modules[n], modules[d])] + [n]
        if len(distinct) > 1:
            raise ConfigError(
                f"roles: {label(distinct[0])} and {label(distinct[1])} could both be the {role} "
                f"({' and '.join(repr(a) for a in distinct)} are {role} names); {fix(role, distinct)}."
            )
        if distinct:
            choice.attrs[role] = distinct[0]
            taken.append(modules[distinct[0]])

    if "policy" not in choice.attrs and "policy" not in explicit and SOLE_POLICY_ATTR in modules:
        model = SOLE_POLICY_ATTR
        others = [n for n in modules if n != model and free(n) and _is_trainable(modules[n])]
        if free(model) and (not sole_model or not others):
            choice.attrs = {"policy": model, **choice.attrs}
            taken.append(modules[model])

    for n in refs:
        choice.not_saved[n] = "reward model" if n in _REWARD_ATTRS else "reference model"
    choice.excluded = tuple(refs)
    frozen = [n for n in modules if free(n) and _is_frozen(modules[n])]
    for n in frozen:
        choice.not_saved[n] = "frozen"
    choice.frozen = tuple(frozen)
    left = [n for n in modules if free(n) and n not in frozen and _is_trainable(modules[n])]
    if not choice.attrs and not explicit:
        choice.attrs["policy"] = ""  # the whole module, less reference and frozen modules
    elif "policy" not in choice.attrs and "policy" not in explicit and "critic" in choice.attrs and left:
        raise ConfigError(
            f"roles: found the critic ({label(choice.attrs['critic'])}) but no policy: none of "
            f"{', '.join(ROLE_ALIASES['policy'])} is a module of {owner}, and the trainable "
            f"{', '.join(label(n) for n in left)} would belong to no role; {fix('policy', left[:1])}."
        )
    order = {"policy": 0, "critic": 1}
    choice.attrs = dict(sorted(choice.attrs.items(), key=lambda kv: order.get(kv[0], 2)))
    return choice


def _roles_fix(role: str, attrs: Sequence[str]) -> str:
    """The ``roles=`` mapping that settles a role (Lightning's wording)."""
    if len(attrs) == 1:
        return f"pass SkyRLCheckpoint(roles={{{role!r}: {attrs[0]!r}}}) to save it as the {role}"
    return f"pass SkyRLCheckpoint(roles={{{role!r}: {attrs[0]!r}}}) (or {attrs[1]!r}) to say which one is the {role}"


def discover_roles(
    module: "torch.nn.Module",
    role_attrs: Optional[Mapping[str, Optional[str]]] = None,
    ref_attrs: Sequence[str] = REF_ATTRS,
    root: Optional["torch.nn.Module"] = None,
    choice: Optional[RoleChoice] = None,
) -> list[Role]:
    """Find the roles of a training module (see the module docstring for the names).

    ``role_attrs`` (``roles=``) maps roles to attributes (dotted paths allowed); roles it does
    not name are discovered by name. A module matching no role name is saved whole as
    ``policy``, less reference models and frozen modules. ``choice`` reuses an earlier
    :func:`choose_roles` decision (the Lightning callback decides once per ``fit``).

    With ``root`` (a wrapper around ``module`` that owns its parameters, such as the FSDP1 root
    of Lightning's ``FSDPStrategy``), each role is a view on ``root``: ``Role(model=root,
    include_prefix="policy.")``, or ``include_prefix=""`` for a module saved whole.

    Raises:
        ConfigError: see :func:`choose_roles`.
    """
    if choice is None:
        choice = module_role_choice(module, role_attrs, ref_attrs)
    roles: list[Role] = []
    for name, attr in choice.attrs.items():
        if attr == "":
            prefixes = choice.unsaved_prefixes() + tuple(f"{a}." for a in choice.frozen)
            if root is None:
                roles.append(Role(name=name, model=module, exclude_prefixes=prefixes))
            else:
                roles.append(Role(name=name, model=root, exclude_prefixes=prefixes, include_prefix=""))
        elif root is None:
            roles.append(Role(name=name, model=_lookup(module, attr)))
        else:
            roles.append(Role(name=name, model=root, include_prefix=f"{attr}."))
    return roles


def module_role_choice(
    module: "torch.nn.Module",
    role_attrs: Optional[Mapping[str, Optional[str]]] = None,
    ref_attrs: Sequence[str] = REF_ATTRS,
) -> RoleChoice:
    """:func:`choose_roles` over the attributes of ``module``, with its unowned parameters."""
    choice = choose_roles(
        dict(module.named_children()), role_attrs, ref_attrs, lookup=lambda a: _lookup(module, a),
        owner=type(module).__name__,
    )
    choice.unowned = unassigned_parameters(module, choice)
    return choice


def unassigned_parameters(module: "torch.nn.Module", roles: Any, ref_attrs: Sequence[str] = REF_ATTRS) -> list[str]:
    """Clean names of trainable parameters of ``module`` outside every role, reference model and
    frozen module. ``roles`` is a :class:`RoleChoice` or a list of :class:`Role`."""
    if isinstance(roles, RoleChoice):
        if "" in roles.attrs.values():
            return []
        skip = roles.role_prefixes() + roles.unsaved_prefixes() + tuple(f"{a}." for a in roles.frozen)
        return [clean_name(n) for n, p in module.named_parameters()
                if p.requires_grad and not clean_name(n).startswith(skip)]
    import torch

    covered: set[int] = set()
    for role in roles:
        covered |= _role_param_ids(role)
    for attr in ref_attrs:
        sub = getattr(module, attr, None)
        if isinstance(sub, torch.nn.Module):
            covered |= _param_ids(sub)
    return [n for n, p in module.named_parameters() if id(p) not in covered]


def outside_roles_state(module: "torch.nn.Module", choice: RoleChoice) -> dict:
    """The state of ``module`` that no role saves, to keep in ``trainer_state.pt``: every
    state-dict entry outside the roles and reference models, less the parameters of frozen
    modules (their buffers stay)."""
    if "" in choice.attrs.values():  # saved whole: only the frozen modules' buffers are left
        keep = tuple(f"{a}." for a in choice.frozen)
        if not keep:
            return {}
        params = {clean_name(n) for n, _ in module.named_parameters(remove_duplicate=False)}
        return {k: v for k, v in module.state_dict().items() if k.startswith(keep) and k not in params}
    skip = choice.role_prefixes() + choice.unsaved_prefixes()
    frozen = tuple(f"{a}." for a in choice.frozen)
    frozen_params = {clean_name(n) for n, _ in module.named_parameters(remove_duplicate=False)
                     if clean_name(n).startswith(frozen)} if frozen else set()
    return {k: v for k, v in module.state_dict().items() if not k.startswith(skip) and k not in frozen_params}


# --------------------------------------------------------------------------- optimizers
@dataclass
class OptimizerAssignment:
    """What :func:`assign_optimizers` decided besides filling the roles.

    Attributes:
        unowned_optimizers: optimizers updating parameters of no role (saved in
            ``trainer_state.pt`` by the integrations, not under a role).
        unowned_schedulers: the LR schedulers of those optimizers (and schedulers of no
            known optimizer).
        warnings: one line per optimizer that updates parameters outside the role it is saved
            under (or of no role), naming the parameters.
    """

    unowned_optimizers: list = field(default_factory=list)
    unowned_schedulers: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def _names(params: Sequence[Any], names: Mapping[int, str], limit: int = 6) -> str:
    shown = [names.get(id(p)) or f"<tensor {tuple(p.shape)}>" for p in params[:limit]]
    more = f" and {len(params) - limit} more" if len(params) > limit else ""
    return ", ".join(shown) + more


def assign_optimizers(roles: list[Role], optimizers: Sequence[Any], schedulers: Sequence[Any],
                      names: Optional[Mapping[int, str]] = None) -> OptimizerAssignment:
    """Attach each optimizer (and its schedulers) to the role whose parameters it updates.

    The rule: an optimizer goes to the first role (``policy``, then ``critic``) whose parameters
    it updates, and never to a role none of whose parameters it updates. When it also updates
    parameters of another role or of no role (one optimizer over the whole module, the usual
    case in automatic optimization), it is still saved once, under that first role, and a
    warning names those parameters. An optimizer that updates no role's parameters is not put in
    any role: it is returned in :attr:`OptimizerAssignment.unowned_optimizers` (the
    integrations keep it in ``trainer_state.pt``), with a warning. A scheduler follows its
    optimizer (its ``optimizer`` attribute).

    Args:
        names: ``id(parameter)`` -> name, for the warnings.
    """
    out = OptimizerAssignment()
    names = dict(names or {})
    for role in roles:
        role.optimizers, role.schedulers = [], []
    if not roles:
        out.unowned_optimizers = list(optimizers)
        out.unowned_schedulers = list(schedulers)
        return out
    ids = {role.name: _role_param_ids(role) for role in roles}
    owner_of: dict[int, Optional[Role]] = {}

    def owner_for(opt: Any, index: Optional[int]) -> Optional[Role]:
        params = [p for g in opt.param_groups for p in g["params"]]
        owners = [r for r in roles if any(id(p) in ids[r.name] for p in params)]
        what = f"optimizer {index} ({type(opt).__name__})" if index is not None else f"{type(opt).__name__}"
        if not owners:
            out.warnings.append(
                f"{what} updates no role's parameters ({_names(params, names)}); it is saved in trainer_state.pt, "
                f"not under a role. Map the module holding them to a role with roles=... to save it there.")
            return None
        owner = owners[0]
        others = [p for p in params if id(p) not in ids[owner.name]]
        if others:
            roles_touched = ", ".join(r.name for r in owners)
            out.warnings.append(
                f"{what} updates parameters of {roles_touched if len(owners) > 1 else owner.name}"
                f"{' and of no role' if any(all(id(p) not in ids[r.name] for r in roles) for p in others) else ''}; "
                f"it is saved once, under {owner.name}/, with its state for {_names(others, names)} "
                f"(use one optimizer per role to give each role its own).")
        return owner

    for i, opt in enumerate(optimizers):
        owner = owner_for(opt, i)
        owner_of[id(opt)] = owner
        if owner is None:
            out.unowned_optimizers.append(opt)
        else:
            owner.optimizers.append(opt)
    for sched in schedulers:
        opt = getattr(sched, "optimizer", None)
        if id(opt) in owner_of:
            owner = owner_of[id(opt)]
        elif opt is not None and hasattr(opt, "param_groups"):
            owner = owner_for(opt, None)
        else:
            owner = None
            out.warnings.append(f"LR scheduler {type(sched).__name__} has no optimizer attribute; it is saved in "
                                f"trainer_state.pt, not under a role.")
        if owner is None:
            out.unowned_schedulers.append(sched)
        else:
            owner.schedulers.append(sched)
    return out


def unowned_state(assignment: OptimizerAssignment) -> dict:
    """State of the optimizers/schedulers of no role, for ``trainer_state.pt``."""
    return {"optimizers": [o.state_dict() for o in assignment.unowned_optimizers],
            "schedulers": [s.state_dict() for s in assignment.unowned_schedulers]}


def load_unowned_state(assignment: OptimizerAssignment, saved: Optional[Mapping[str, Any]], path: str = "") -> None:
    """Restore :func:`unowned_state` (``saved`` None: the checkpoint holds none).

    Raises:
        IncompatibleCheckpointError: the checkpoint holds a different number of them.
    """
    from skyrl_callbacks.errors import IncompatibleCheckpointError

    saved = saved or {"optimizers": [], "schedulers": []}
    for what, objs in (("optimizers", assignment.unowned_optimizers), ("schedulers", assignment.unowned_schedulers)):
        states = list(saved.get(what) or [])
        if len(states) != len(objs):
            raise IncompatibleCheckpointError(
                f"{path}: trainer_state.pt holds {len(states)} {what[:-1]} state(s) of no role but this run has "
                f"{len(objs)} {what} updating parameters of no role. Configure them as the run that saved it did.")
        for obj, st in zip(objs, states):
            obj.load_state_dict(st)


# --------------------------------------------------------------------------- the mapping line
def role_size(role: Role) -> tuple[int, int]:
    """(number of tensors, bytes) of ``role`` on this rank, from its parameters and buffers
    (no ``state_dict()``: it is a collective for FSDP1)."""
    seen: set[int] = set()
    count = size = 0
    tensors = [(clean_name(n), p) for n, p in role.model.named_parameters(remove_duplicate=False)]
    for mname, m in role.model.named_modules(remove_duplicate=False):
        for bname, b in m._buffers.items():  # persistent buffers: what state_dict() holds
            if b is not None and bname not in m._non_persistent_buffers_set:
                tensors.append((clean_name(f"{mname}.{bname}" if mname else bname), b))
    for name, t in tensors:
        if role.is_view:
            if role.own_key(name) is None:
                continue
        elif role.exclude_prefixes and name.startswith(role.exclude_prefixes):
            continue
        count += 1
        if id(t) not in seen:
            seen.add(id(t))
            size += t.numel() * t.element_size()
    return count, size


def _indices(objs: Sequence[Any], index: Mapping[int, int], what: str) -> str:
    idx = [str(index[id(o)]) for o in objs if id(o) in index]
    if not idx:
        return f"no {what}"
    return f"{what}{'s' if len(idx) > 1 else ''} {', '.join(idx)}"


def describe_roles(roles: Sequence[Role], sources: Mapping[str, str], not_saved: Mapping[str, str],
                   optimizers: Sequence[Any] = (), schedulers: Sequence[Any] = (),
                   assignment: Optional[OptimizerAssignment] = None, unowned: Sequence[str] = ()) -> str:
    """``[skyrl-ckpt] roles: policy <- module.actor (6 tensors, 0.1 MB; optimizer 0, scheduler 0); ...``

    ``sources``: role -> where it comes from (``module.actor``, ``actor=``); ``not_saved``:
    source -> reason; optimizers/schedulers are numbered by their position in the given lists.
    """
    oi = {id(o): i for i, o in enumerate(optimizers)}
    si = {id(s): i for i, s in enumerate(schedulers)}
    parts = []
    for role in roles:
        n, size = role_size(role)
        parts.append(f"{role.name} <- {sources.get(role.name, role.name)} ({n} tensors, {size / 1e6:.1f} MB; "
                     f"{_indices(role.optimizers, oi, 'optimizer')}, {_indices(role.schedulers, si, 'scheduler')})")
    line = "[skyrl-ckpt] roles: " + "; ".join(parts)
    if not_saved:
        line += "; not saved: " + ", ".join(f"{k} ({v})" for k, v in not_saved.items())
    extra = []
    if unowned:
        extra.append(", ".join(unowned))
    if assignment is not None and (assignment.unowned_optimizers or assignment.unowned_schedulers):
        extra.append(", ".join(filter(None, [
            _indices(assignment.unowned_optimizers, oi, "optimizer") if assignment.unowned_optimizers else "",
            _indices(assignment.unowned_schedulers, si, "scheduler") if assignment.unowned_schedulers else ""])))
    if extra:
        line += "; in trainer_state.pt (no role): " + ", ".join(extra)
    return line
