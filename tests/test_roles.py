"""Roles as RL code names them: found (actor/critic/...), refused loudly (ambiguity, a critic without a
policy), never mis-saved (an optimizer only under the role whose parameters it updates), in real
Lightning runs and bound loops; RL loop shapes (IterableDataset rollouts, inner optimizer loops,
several optimizers per role, tuple configure_optimizers, frozen modules) resume bitwise."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from skyrl_callbacks import ConfigError, ResumableDataLoader, SkyRLCheckpoint
from skyrl_callbacks.roles import assign_optimizers, discover_roles, module_role_choice

pl = pytest.importorskip("lightning.pytorch")


# --------------------------------------------------------------------------- the table
def _module(**children):
    m = nn.Module()
    for k, v in children.items():
        setattr(m, k, v)
    return m


@pytest.mark.parametrize("policy_attr", ["policy", "actor", "actor_model", "policy_model"])
@pytest.mark.parametrize("critic_attr", ["critic", "value_model", "value_net", "value_head"])
def test_role_names_of_rl_code(policy_attr, critic_attr):
    m = _module(**{policy_attr: nn.Linear(2, 2), critic_attr: nn.Linear(2, 1), "ref": nn.Linear(2, 2),
                   "reward_model": nn.Linear(2, 1), "rm": nn.Linear(2, 1), "ref_model": nn.Linear(2, 2)})
    roles = discover_roles(m)
    assert [(r.name, r.model) for r in roles] == [("policy", getattr(m, policy_attr)), ("critic", getattr(m, critic_attr))]
    choice = module_role_choice(m)
    assert choice.not_saved == {"ref": "reference model", "reward_model": "reward model", "rm": "reward model",
                                "ref_model": "reference model"}
    assert choice.unowned == []


def test_model_is_the_policy_only_when_it_is_the_only_trainable_module():
    m = _module(model=nn.Linear(2, 2), ref=nn.Linear(2, 2), frozen=nn.Linear(2, 2).requires_grad_(False))
    assert [(r.name, r.model) for r in discover_roles(m)] == [("policy", m.model)]
    m = _module(model=nn.Linear(2, 2), critic=nn.Linear(2, 1))
    assert [(r.name, r.model) for r in discover_roles(m)] == [("policy", m.model), ("critic", m.critic)]
    m = _module(model=nn.Linear(2, 2), head=nn.Linear(2, 2))  # two trainable modules: saved whole
    (whole,) = discover_roles(m)
    assert whole.model is m and whole.name == "policy"


def test_frozen_module_is_not_saved_but_its_buffers_are_kept():
    enc = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).requires_grad_(False)
    m = _module(actor=nn.Linear(2, 2), encoder=enc)
    choice = module_role_choice(m)
    assert choice.attrs == {"policy": "actor"} and choice.not_saved == {"encoder": "frozen"}
    from skyrl_callbacks.roles import outside_roles_state

    assert set(outside_roles_state(m, choice)) == {"encoder.1.running_mean", "encoder.1.running_var",
                                                   "encoder.1.num_batches_tracked"}


@pytest.mark.parametrize("a,b,role", [("policy", "actor", "policy"), ("actor", "policy_model", "policy"),
                                      ("critic", "value_head", "critic"), ("value_model", "value_net", "critic")])
def test_two_candidates_for_one_role_are_refused(a, b, role):
    m = _module(**{a: nn.Linear(2, 2), b: nn.Linear(2, 2)})
    with pytest.raises(ConfigError) as err:
        discover_roles(m)
    msg = str(err.value)
    assert f"module.{a} and module.{b} could both be the {role}" in msg, msg
    assert f"roles={{'{role}': '{a}'}}" in msg, msg
    # roles= settles it; the other role is still found by name
    m.add_module("critic" if role == "policy" else "policy", nn.Linear(2, 2))
    roles = discover_roles(m, {role: b})
    assert {r.name: r.model for r in roles}[role] is getattr(m, b) and len(roles) == 2
    # the same module under two names is one candidate
    same = _module(**{a: m.get_submodule(a), b: m.get_submodule(a)})
    assert [r.model for r in discover_roles(same)][:1] == [same.get_submodule(a)]


def test_a_critic_without_a_policy_is_refused():
    m = _module(net=nn.Linear(2, 2), critic=nn.Linear(2, 1))
    with pytest.raises(ConfigError) as err:
        discover_roles(m)
    msg = str(err.value)
    assert "found the critic (module.critic) but no policy" in msg and "module.net" in msg, msg
    assert "roles={'policy': 'net'}" in msg, msg
    assert [r.model for r in discover_roles(m, {"policy": "net"})] == [m.net, m.critic]


def test_dotted_role_paths():
    agent = _module(actor=nn.Linear(2, 2), critic=nn.Linear(2, 1))
    m = _module(agent=agent)
    roles = discover_roles(m, {"policy": "agent.actor", "critic": "agent.critic"})
    assert [r.model for r in roles] == [agent.actor, agent.critic]


def test_optimizers_only_under_roles_whose_parameters_they_update():
    m = _module(actor=nn.Linear(2, 2), critic=nn.Linear(2, 1), extra=nn.Linear(2, 2))
    roles = discover_roles(m)
    names = {id(p): f"module.{n}" for n, p in m.named_parameters()}
    o_critic_extra = torch.optim.SGD([*m.critic.parameters(), *m.extra.parameters()], lr=0.1)
    o_extra = torch.optim.SGD(m.extra.parameters(), lr=0.1)
    o_both = torch.optim.SGD([*m.actor.parameters(), *m.critic.parameters()], lr=0.1)
    s_extra = torch.optim.lr_scheduler.StepLR(o_extra, 2)
    out = assign_optimizers(roles, [o_critic_extra, o_extra, o_both], [s_extra], names)
    by = {r.name: r for r in roles}
    # never under policy, which none of its parameters belong to
    assert by["critic"].optimizers == [o_critic_extra] and by["policy"].optimizers == [o_both]
    assert out.unowned_optimizers == [o_extra] and out.unowned_schedulers == [s_extra]
    assert by["policy"].schedulers == [] and by["critic"].schedulers == []
    text = "\n".join(out.warnings)
    assert "optimizer 0 (SGD) updates parameters of critic and of no role" in text
    assert "module.extra.weight, module.extra.bias" in text
    assert "optimizer 1 (SGD) updates no role's parameters (module.extra.weight, module.extra.bias)" in text
    assert "optimizer 2 (SGD) updates parameters of policy, critic; it is saved once, under policy/" in text
    assert "module.critic.weight" in text


# --------------------------------------------------------------------------- Lightning PPO
class Rollouts(IterableDataset):
    """Endless rollouts, no length; all their state is the module's generator (so the dataset's own
    state, for ResumableDataLoader, is empty: nothing to fast-forward)."""

    def __init__(self, module):
        self.module = module

    def __iter__(self):
        while True:
            yield self.module.rollout()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class PPO(pl.LightningModule):
    """The common way: self.actor / self.critic, manual optimization, one Adam each."""

    def __init__(self, hf=False, layout="lists", nb_optim_iters=2):
        super().__init__()
        torch.manual_seed(0)
        if hf:
            from tests.hf_utils import tiny_llama

            self.actor = tiny_llama()
        else:
            self.actor = nn.Linear(6, 6)
        self.critic = nn.Linear(6, 1)
        self.ref = copy.deepcopy(self.actor).requires_grad_(False)
        # frozen, not a reference model; its BatchNorm statistics still move
        self.encoder = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)).requires_grad_(False)
        self.rollout_gen = torch.Generator().manual_seed(1)
        self.hf, self.layout, self.nb_optim_iters = hf, layout, nb_optim_iters
        self.automatic_optimization = False
        self.seen = []

    def rollout(self):
        return torch.randint(0, 128, (2, 6), generator=self.rollout_gen)

    def training_step(self, batch, batch_idx):
        feats = self.encoder(batch.float())
        noise = torch.rand(1)  # the global RNG
        self.seen.append((batch.tolist(), float(noise)))
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for _ in range(self.nb_optim_iters):
            if self.hf:
                logits = self.actor(input_ids=batch).logits.float()
                with torch.no_grad():
                    ref = self.ref(input_ids=batch).logits.float()
            else:
                logits = self.actor(feats)
                ref = self.ref(feats)
            loss = (logits - ref).pow(2).mean() + noise * logits.mean() + self.critic(feats).pow(2).mean()
            for o in opts:
                o.zero_grad()
            self.manual_backward(loss.sum())
            for o in opts:
                o.step()
        scheds = self.lr_schedulers()
        for s in scheds if isinstance(scheds, list) else [scheds] if scheds is not None else []:
            s.step()

    def configure_optimizers(self):
        actor = torch.optim.Adam(self.actor.parameters(), lr=1e-2)
        critic = torch.optim.Adam(self.critic.parameters(), lr=1e-2)
        warm = lambda s: min(1.0, (s + 1) / 3)  # noqa: E731
        if self.layout == "tuple":
            return (actor, critic)
        if self.layout == "multi":  # two optimizers for the actor
            a_w = torch.optim.Adam([self.actor.weight], lr=1e-2)
            a_b = torch.optim.SGD([self.actor.bias], lr=1e-2, momentum=0.9)
            return [a_w, critic, a_b], [torch.optim.lr_scheduler.LambdaLR(a_b, warm),
                                        torch.optim.lr_scheduler.LambdaLR(critic, warm)]
        return [actor, critic], [torch.optim.lr_scheduler.LambdaLR(actor, warm),
                                 torch.optim.lr_scheduler.LambdaLR(critic, warm)]


def _fit(module, cb, batches):
    per_batch = module.nb_optim_iters * len(module.configure_optimizers()[0] if module.layout != "tuple" else (1, 2))
    trainer = pl.Trainer(max_steps=batches * per_batch, accelerator="cpu", callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, ResumableDataLoader(Rollouts(module), batch_size=None))
    return trainer


def _final(module, trainer):
    return {
        "sd": {k: v.clone() for k, v in module.state_dict().items()},
        "opts": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
        "scheds": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "rng": torch.get_rng_state(), "gen": module.rollout_gen.get_state(),
    }


def _assert_equal(a, b):
    assert a["sd"].keys() == b["sd"].keys()
    for k in a["sd"]:
        assert torch.equal(a["sd"][k], b["sd"][k]), k
    for oa, ob in zip(a["opts"], b["opts"], strict=True):
        assert oa["param_groups"] == ob["param_groups"]
        for pid, st in oa["state"].items():
            for key, val in st.items():
                assert torch.equal(torch.as_tensor(val), torch.as_tensor(ob["state"][pid][key])), (pid, key)
    assert a["scheds"] == b["scheds"]
    assert torch.equal(a["rng"], b["rng"]) and torch.equal(a["gen"], b["gen"])


def _straight_and_resumed(tmp_path, batches, stop_at, **kw):
    extra_cfg, ckw = kw.pop("cfg", {}), kw.pop("ckpt", {})
    cfg = lambda name: {"ckpt_interval": 2, "ckpt_path": str(tmp_path / name / "c"),  # noqa: E731
                        "export_path": str(tmp_path / name / "e"), **extra_cfg}
    torch.manual_seed(0)
    straight = PPO(**kw)
    t = _fit(straight, SkyRLCheckpoint(cfg("straight"), **ckw), batches)
    a = _final(straight, t)
    torch.manual_seed(0)
    first = PPO(**kw)
    _fit(first, SkyRLCheckpoint(cfg("crashed"), **ckw), stop_at)
    torch.manual_seed(123)  # whatever the new process draws, the resume restores the saved RNG
    rerun = PPO(**kw)
    cb = SkyRLCheckpoint(cfg("crashed"), **ckw)
    t = _fit(rerun, cb, batches)
    assert cb.resumed_step == stop_at
    _assert_equal(a, _final(rerun, t))
    assert first.seen + rerun.seen == straight.seen  # same rollouts, same noise, step by step
    return straight, rerun, tmp_path / "crashed" / "c", tmp_path / "crashed" / "e"


def test_ppo_actor_critic_iterable_rollouts_saves_roles_exports_and_resumes_bitwise(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    caplog.set_level(logging.INFO)
    straight, rerun, ck, ex = _straight_and_resumed(tmp_path, 4, 2, hf=True, nb_optim_iters=1,
                                                    cfg={"hf_save_interval": 3})
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("global_step_")) == [
        "global_step_2", "global_step_4"]
    step = ck / "global_step_4"
    n_actor = len(list(rerun.actor.parameters()))
    pol_opt = torch.load(step / "policy" / "optimizer_state.pt", weights_only=True)
    crit_opt = torch.load(step / "critic" / "optimizer_state.pt", weights_only=True)
    assert "__skyrl_multi__" not in pol_opt and "__skyrl_multi__" not in crit_opt
    assert len(pol_opt["state"]) == n_actor and len(crit_opt["state"]) == 2  # each its own Adam
    assert crit_opt["state"][0]["exp_avg"].shape == rerun.critic.weight.shape
    for role in ("policy", "critic"):
        assert (step / role / "lr_scheduler_state.pt").is_file()
    assert set(torch.load(step / "critic" / "model_state.pt", weights_only=True)) == {"weight", "bias"}
    assert set(torch.load(step / "policy" / "model_state.pt", weights_only=True)) == set(rerun.actor.state_dict())
    ts = torch.load(step / "trainer_state.pt", weights_only=False)
    extra = ts["lightning"]["module_extra_state"]
    assert set(extra) == {"encoder.1.running_mean", "encoder.1.running_var", "encoder.1.num_batches_tracked"}
    assert "no_role" not in ts
    # the actor exported to HF, at the interval and at the end
    assert sorted(p.name for p in ex.iterdir()) == ["global_step_2", "global_step_3", "global_step_4"]  # 2, 4: ends
    loaded = AutoModelForCausalLM.from_pretrained(str(ex / "global_step_4" / "policy"))
    for k, v in rerun.actor.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    lines = [r.getMessage() for r in caplog.records if "[skyrl-ckpt] roles:" in r.getMessage()]
    assert len({*lines}) == 1, lines
    line = lines[0]
    assert line.startswith(f"[skyrl-ckpt] roles: policy <- module.actor ({len(rerun.actor.state_dict())} tensors, ")
    assert "MB; optimizer 0, scheduler 0); critic <- module.critic (2 tensors, 0.0 MB; optimizer 1, scheduler 1)" in line
    assert line.endswith("not saved: module.ref (reference model), module.encoder (frozen)"), line


@pytest.mark.parametrize("layout", ["tuple", "multi"])
def test_rl_loop_shapes_keep_the_step_rule_and_resume_bitwise(tmp_path, layout):
    """configure_optimizers returning a tuple; two optimizers for the actor; 3 optimizer steps per batch."""
    _, rerun, ck, _ = _straight_and_resumed(tmp_path, 4, 2, layout=layout, nb_optim_iters=3)
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("global_step_")) == [
        "global_step_2", "global_step_4"]  # completed batches, not 3 x optimizers steps
    step = ck / "global_step_4"
    pol = torch.load(step / "policy" / "optimizer_state.pt", weights_only=True)
    crit = torch.load(step / "critic" / "optimizer_state.pt", weights_only=True)
    if layout == "multi":
        assert pol["__skyrl_multi__"] and [len(s["state"]) for s in pol["states"]] == [1, 1]
        assert "momentum_buffer" in pol["states"][1]["state"][0]
        sched = torch.load(step / "policy" / "lr_scheduler_state.pt", weights_only=True)
        assert "__skyrl_multi__" not in sched  # the SGD's LambdaLR only
    else:
        assert len(pol["state"]) == 2 and not (step / "policy" / "lr_scheduler_state.pt").exists()
    assert len(crit["state"]) == 2


class WithStray(PPO):
    """A trainable module outside every role, with its own optimizer (a learned temperature)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.temperature = nn.Linear(1, 1)

    def configure_optimizers(self):
        opts, scheds = super().configure_optimizers()
        return [*opts, torch.optim.Adam(self.temperature.parameters(), lr=0.1)], scheds

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        t = self.optimizers()[-1]
        t.zero_grad()
        self.manual_backward(self.temperature(torch.ones(1, 1)).pow(2).sum())
        t.step()


def test_trainable_module_of_no_role_warns_and_round_trips(tmp_path):
    def fit(module, batches):
        cb = SkyRLCheckpoint({"ckpt_interval": 2, "ckpt_path": str(tmp_path / "c")})
        trainer = pl.Trainer(max_steps=batches * 5, accelerator="cpu", callbacks=[cb], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, ResumableDataLoader(Rollouts(module), batch_size=None))
        return trainer

    with pytest.warns(UserWarning) as rec:
        fit(WithStray(nb_optim_iters=2), 2)
    text = "\n".join(str(w.message) for w in rec)
    assert "trainable parameters outside every role: module.temperature.weight, module.temperature.bias" in text
    assert "SkyRLCheckpoint(cfg, roles={'policy': 'temperature'})" in text
    assert "optimizer 2 (Adam) updates no role's parameters (module.temperature.weight, module.temperature.bias)" in text
    step = tmp_path / "c" / "global_step_2"
    # the temperature's optimizer is in trainer_state.pt, not in a role it does not update
    assert len(torch.load(step / "policy" / "optimizer_state.pt", weights_only=True)["state"]) == 2
    assert len(torch.load(step / "critic" / "optimizer_state.pt", weights_only=True)["state"]) == 2
    ts = torch.load(step / "trainer_state.pt", weights_only=False)
    assert len(ts["no_role"]["optimizers"]) == 1 and ts["no_role"]["optimizers"][0]["state"][0]["step"] == 2
    assert "temperature.weight" in ts["lightning"]["module_extra_state"]
    m = WithStray(nb_optim_iters=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = fit(m, 3)
    # resumed at 2 with the temperature's weight and Adam state, then one more batch: 3 Adam steps
    assert trainer.optimizers[-1].state_dict()["state"][0]["step"] == 3


class OneOptimizer(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.actor = nn.Linear(4, 4)
        self.value_head = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.actor(batch).pow(2).mean() + self.value_head(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1)


def test_one_optimizer_over_both_roles_is_saved_under_policy_with_a_warning(tmp_path):
    cb = SkyRLCheckpoint({"ckpt_interval": 2, "ckpt_path": str(tmp_path / "c")})
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match=r"optimizer 0 \(Adam\) updates parameters of policy, critic; it is saved "
                                         r"once, under policy/, with its state for module.value_head.weight"):
        trainer.fit(OneOptimizer(), DataLoader(torch.randn(4, 4), batch_size=2))
    step = tmp_path / "c" / "global_step_2"
    assert len(torch.load(step / "policy" / "optimizer_state.pt", weights_only=True)["state"]) == 4
    assert not (step / "critic" / "optimizer_state.pt").exists()
    assert set(torch.load(step / "critic" / "model_state.pt", weights_only=True)) == {"weight", "bias"}


class Ambiguous(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.policy = nn.Linear(4, 4)
        self.actor = nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        return self.actor(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ambiguity_stops_fit_before_training(tmp_path):
    cb = SkyRLCheckpoint({"ckpt_path": str(tmp_path / "c")})
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match=r"module.policy and module.actor could both be the policy .* "
                                          r"SkyRLCheckpoint\(roles=\{'policy': 'policy'\}\) \(or 'actor'\)"):
        trainer.fit(Ambiguous(), DataLoader(torch.randn(4, 4), batch_size=2))
    assert trainer.global_step == 0 and not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- bind (Accelerate / plain loops)
def test_bind_finds_actor_and_critic_keywords(tmp_path, capsys):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    def loop(steps):
        torch.manual_seed(0)
        acc = Accelerator(cpu=True)
        actor, critic, ref = nn.Linear(3, 3), nn.Linear(3, 1), nn.Linear(3, 3).requires_grad_(False)
        oa, oc = torch.optim.Adam(actor.parameters(), lr=0.1), torch.optim.SGD(critic.parameters(), lr=0.1)
        sa = torch.optim.lr_scheduler.StepLR(oa, 2)
        actor, critic, oa, oc, sa = acc.prepare(actor, critic, oa, oc, sa)
        ckpt = SkyRLCheckpoint({"ckpt_path": str(tmp_path / "c"), "export_path": str(tmp_path / "e"),
                                "ckpt_interval": 2, "hf_save_interval": 3})
        state = ckpt.bind(acc, actor=actor, value_model=critic, ref_model=ref, optimizers=[oc, oa], schedulers=sa)
        for _ in range(state.step + 1, steps + 1):
            loss = actor(torch.ones(2, 3)).pow(2).mean() + critic(torch.ones(2, 3)).pow(2).mean()
            loss.backward()
            oa.step(), oc.step(), sa.step()
            oa.zero_grad(), oc.zero_grad()
            ckpt.step()
        ckpt.finish()
        return actor, oa

    actor, oa = loop(3)
    out = capsys.readouterr().out
    assert ("[skyrl-ckpt] roles: policy <- actor= (2 tensors, 0.0 MB; optimizer 1, scheduler 0); "
            "critic <- value_model= (2 tensors, 0.0 MB; optimizer 0, no scheduler); "
            "not saved: ref_model= (reference model)") in out, out
    step = tmp_path / "c" / "global_step_3"
    assert "exp_avg" in torch.load(step / "policy" / "optimizer_state.pt", weights_only=True)["state"][0]
    assert "exp_avg" not in str(torch.load(step / "critic" / "optimizer_state.pt", weights_only=True))
    assert (tmp_path / "e" / "global_step_3" / "policy").is_dir()
    with pytest.raises(ConfigError, match=r"bind\(\): policy= and actor= both name the policy"):
        SkyRLCheckpoint({"ckpt_path": str(tmp_path / "x")}).bind(None, policy=nn.Linear(2, 2), actor=nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=r"critic= and value_head= could both be the critic .* pass only one"):
        SkyRLCheckpoint({"ckpt_path": str(tmp_path / "x")}).bind(None, model=nn.Linear(2, 2), critic=nn.Linear(2, 1),
                                                                 value_head=nn.Linear(2, 1))


class Validated(OneOptimizer):
    def validation_step(self, batch, batch_idx):
        return None


class Endless(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.ones(2, 4)


def test_unsized_loader_with_validation_keeps_lightnings_look_ahead_and_says_so(tmp_path):
    class Fetcher(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            self.kind = type(trainer.fit_loop._data_fetcher).__name__

    cb, seen = SkyRLCheckpoint({"ckpt_interval": 5, "ckpt_path": str(tmp_path / "c")}), Fetcher()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", callbacks=[cb, seen], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, val_check_interval=1,
                         limit_val_batches=1, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="no length and validation is on"):
        trainer.fit(Validated(), DataLoader(Endless(), batch_size=None), DataLoader(Endless(), batch_size=None))
    assert seen.kind == "_PrefetchDataFetcher"  # Lightning's, with its look-ahead


def test_bind_takes_model_as_the_policy(tmp_path, capsys):
    net, ref = nn.Linear(2, 2), nn.Linear(2, 2)
    ckpt = SkyRLCheckpoint({"ckpt_path": str(tmp_path / "c")})
    ckpt.bind(None, model=net, reward_model=ref, optimizers=torch.optim.SGD(net.parameters(), lr=0.1))
    assert [(r.name, r.model) for r in ckpt._binding.roles] == [("policy", net)]
    assert ("[skyrl-ckpt] roles: policy <- model= (2 tensors, 0.0 MB; optimizer 0, no scheduler); "
            "not saved: reward_model= (reward model)") in capsys.readouterr().out
    ckpt.finish()
