"""The settings of one training run: four small dataclasses and one home for the presets.

``TrainConfig(env=EnvConfig(...), model=ModelConfig(...), ppo=PPOConfig(...),
gate=GateConfig(...))``; :meth:`TrainConfig.preset` gives the full and quick settings of each
environment, and :meth:`GateConfig.budgeted` the causal gates that meet a communication budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum, StrEnum


class Env(StrEnum):
    """The environments of :func:`gatelab.comm.envs.make_env`."""

    predator_prey = "predator_prey"
    predator_capture_prey = "predator_capture_prey"
    simple_spread = "simple_spread"
    lbforaging = "lbforaging"


class Graph(StrEnum):
    """Who may talk to whom: a learned top-k graph, a fixed random one, everyone, no one."""

    learned = "learned"
    random = "random"
    full = "full"
    none = "none"


class Estimator(StrEnum):
    """How the temporal gate trains: straight-through with a cost, or causal labels (a budget)."""

    st = "st"
    causal = "causal"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


NATIVE_ENVS = tuple(e.value for e in Env)


def _finite(section: object) -> None:
    """Every float field of a config section is a finite number (NaN passes no range check)."""
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


@dataclass(frozen=True)
class EnvConfig:
    """The task: environment, team size and what each agent observes.

    ``name``: a native environment (:class:`Env`) or any PettingZoo parallel environment, named
    by the module whose ``parallel_env(**env_kwargs)`` builds it (``"mpe2.simple_spread_v3"``);
    such an environment decides its own agents (``agents``, ``grid``, ``vision`` are the native
    ones').
    """

    name: str = Env.predator_prey.value
    agents: int = 5  # A (IC3Net medium: 5 predators)
    grid: int = 10  # grid side (IC3Net medium: 10)
    vision: int = 1  # view radius (IC3Net medium: 1)
    episode_limit: int = 0  # 0: the environment's default (40 for a 10x10 grid)
    memory: bool = False  # append the agent's previous action (one-hot; gated: + listened) to obs
    env_kwargs: dict = field(default_factory=dict)  # a PettingZoo module's parallel_env(**kwargs)

    def __post_init__(self) -> None:
        name = str(getattr(self.name, "value", self.name))
        object.__setattr__(self, "name", name)
        _check(name.isidentifier() or all(p.isidentifier() for p in name.split(".")),
               f"unknown env {name!r}; choose from {', '.join(NATIVE_ENVS)} or name a "
               "PettingZoo module with parallel_env(), e.g. mpe2.simple_spread_v3")  # fmt: skip
        _check(
            not self.env_kwargs or self.is_module,
            f"env_kwargs are for PettingZoo modules; {name} takes agents, grid and vision",
        )
        _check(
            self.agents >= 2, f"agents must be >= 2 (communication needs two), got {self.agents}"
        )
        _check(self.grid >= 2, f"grid must be >= 2, got {self.grid}")
        _check(self.vision >= 0, f"vision must be >= 0, got {self.vision}")
        _check(self.episode_limit >= 0, f"episode_limit must be >= 0, got {self.episode_limit}")

    @property
    def is_module(self) -> bool:
        """Whether ``name`` is a PettingZoo module rather than a native environment."""
        return self.name not in NATIVE_ENVS


@dataclass(frozen=True)
class ModelConfig:
    """The CommFormer architecture, its graph and its temporal gate."""

    graph: Graph = Graph.learned
    sparsity: float = 0.4  # S (CommFormer: 0.4)
    temporal_gate: bool = False  # per-agent listen gate
    d_model: int = 64  # embedding width (CommFormer: 64)
    n_heads: int = 1  # attention heads (CommFormer: 1)
    gumbel_tau: float = 1.0  # Gumbel top-k temperature
    gate_hidden: int = 0  # temporal gate: 0 linear, h > 0 a one-hidden-layer MLP of width h
    gate_init_bias: float = 1.0  # temporal gate's initial logit bias (1: p = 0.73, open)

    def __post_init__(self) -> None:
        object.__setattr__(self, "graph", Graph(self.graph))
        _finite(self)
        _check(self.d_model >= 1, f"d_model must be >= 1, got {self.d_model}")
        _check(self.n_heads >= 1, f"n_heads must be >= 1, got {self.n_heads}")
        _check(
            self.d_model % self.n_heads == 0,
            f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}",
        )
        _check(self.gumbel_tau > 0, f"gumbel_tau must be > 0, got {self.gumbel_tau}")
        _check(0.0 <= self.sparsity <= 1.0, f"sparsity must be in [0, 1], got {self.sparsity}")
        _check(self.gate_hidden >= 0, f"gate_hidden must be >= 0, got {self.gate_hidden}")


@dataclass(frozen=True)
class PPOConfig:
    """MAPPO on theta, Adam on the graph logits alpha, and the graph noise's schedule."""

    n_envs: int = 64  # episodes per rollout B
    updates: int = 300  # PPO updates (one rollout each)
    ppo_epochs: int = 4  # epochs per update (CommFormer: 5-15)
    minibatches: int = 2  # minibatches per epoch
    lr: float = 7e-4  # theta Adam learning rate (MAPPO: 5e-4 to 7e-4)
    alpha_lr: float = 0.05  # alpha Adam lr: far above theta's so the graph moves past Gumbel noise
    gate_lr: float = 5e-3  # temporal-gate lr (own param group): its gradient is small
    alpha_every: int = 2  # alpha steps with theta in every n-th epoch (2 of 4 per update)
    alpha_warmup_updates: int = 5  # alpha frozen for the first updates
    gamma: float = 0.99  # discount (MAPPO)
    gae_lambda: float = 0.95  # GAE lambda (MAPPO)
    clip: float = 0.2  # PPO ratio clip
    entropy_coef: float = 0.01  # entropy bonus (MAPPO)
    value_coef: float = 1.0  # value-loss weight (MAPPO)
    max_grad_norm: float = 10.0  # gradient clipping (MAPPO)
    graph_anneal: float = 0.5  # Gumbel noise 1 -> 0 linearly over this share of the updates
    target_kl: float = 0.03  # KL guard: an update stops past this approximate KL (0: off)

    def __post_init__(self) -> None:
        _finite(self)
        for name in ("lr", "alpha_lr", "gate_lr", "gamma", "gae_lambda", "clip", "max_grad_norm"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("entropy_coef", "value_coef", "alpha_warmup_updates"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(self.gamma <= 1 and self.gae_lambda <= 1, "gamma and gae_lambda must be <= 1")
        for name in ("n_envs", "updates", "ppo_epochs", "minibatches", "alpha_every"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.graph_anneal >= 0, f"graph_anneal must be >= 0, got {self.graph_anneal}")
        _check(
            self.target_kl >= 0, f"target_kl must be >= 0 (0: no KL guard), got {self.target_kl}"
        )


@dataclass(frozen=True)
class GateConfig:
    """How the temporal gates train (only read when ``ModelConfig.temporal_gate``).

    ``st`` (the paper's): straight-through gradient plus ``comm_cost`` x the comm rate in the
    loss. ``causal`` (gatelab's, :mod:`gatelab.comm.gating`): the gate classifies its observation
    on labels of the messages' effect, their share adapted so the rate meets ``comm_budget``.
    ``estimator=None``: causal when a budget is given, else st.
    """

    estimator: Estimator | None = None
    comm_cost: float = 0.0  # st: penalty coefficient on the communication rate
    comm_budget: float = 0.0  # causal: the comm rate the execution gates should meet
    budget_lr: float = 0.01  # causal: step of the label share per unit of excess rate
    warmup: float = 0.0  # share of the updates with every gate open (= no gate, untrained)
    temp_min: float = 1.0  # causal: training gates tempered 1 -> this over the gated updates
    anneal: bool = False  # st: anneal the gates' sampling to the threshold as the graph noise

    def __post_init__(self) -> None:
        if self.estimator is not None:
            object.__setattr__(self, "estimator", Estimator(self.estimator))
        _finite(self)
        _check(self.budget_lr > 0, f"gate budget_lr must be > 0, got {self.budget_lr}")
        est = self.kind
        _check(self.comm_cost >= 0, f"comm_cost must be >= 0, got {self.comm_cost}")
        _check(
            0.0 <= self.comm_budget <= 1.0, f"comm_budget must be in [0, 1], got {self.comm_budget}"
        )
        _check(0.0 <= self.warmup <= 1.0, f"gate warmup must be in [0, 1], got {self.warmup}")
        _check(0.0 < self.temp_min <= 1.0, f"gate temp_min must be in (0, 1], got {self.temp_min}")
        if est is Estimator.causal:
            _check(self.comm_budget > 0, "the causal estimator needs comm_budget > 0")
            _check(not self.anneal, "gate anneal is the straight-through gate's (causal: temp_min)")
            _check(self.comm_cost == 0, "the causal gate meets comm_budget; comm_cost is st's")
        else:
            _check(self.comm_budget == 0, "comm_budget needs the causal estimator")
            _check(self.temp_min == 1.0, "gate temp_min < 1 needs the causal estimator")

    @property
    def kind(self) -> Estimator:
        """The estimator in use: ``estimator``, or causal with a budget and st without."""
        if self.estimator is not None:
            return self.estimator
        return Estimator.causal if self.comm_budget > 0 else Estimator.st

    @classmethod
    def budgeted(cls, budget: float) -> GateConfig:
        """Causal gates meeting ``budget``, as in docs/comm.md's table.

        Open for the first 30% of training, then tempered 1 -> 0.1; the label share steps by 0.2
        per unit of excess rate (seed-0 screening, docs/notes/comm.md).
        """
        return cls(comm_budget=budget, budget_lr=0.2, warmup=0.3, temp_min=0.1)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; ``to_dict``/``from_dict`` round-trip it as JSON."""

    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    seed: int = 0  # seeds everything
    device: str = "cpu"  # torch device
    torch_threads: int = 1  # CPU threads (small model: 1 is fastest per core)
    checkpoint_every: int = 50  # updates between checkpoints (and at the end)

    def __post_init__(self) -> None:
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _check(self.torch_threads >= 1, f"torch_threads must be >= 1, got {self.torch_threads}")
        _check(
            self.checkpoint_every >= 1,
            f"checkpoint_every must be >= 1, got {self.checkpoint_every}",
        )

    @classmethod
    def preset(cls, env: Env | str = Env.predator_prey, quick: bool = False) -> TrainConfig:
        """The settings of ``env`` used by ``comm train`` and ``comm compare``.

        Full: Predator-Prey as IC3Net's medium task (5 predators, 10x10, vision 1, limit 40),
        300 updates of 64 episodes; simple_spread with 3 agents, 60 updates of 16.
        ``quick`` (a smoke run of seconds): IC3Net's easy Predator-Prey (3 predators, 5x5,
        limit 20) for 25 updates of 32, a 6-update simple_spread, 20 updates of 32 otherwise.
        """
        env = EnvConfig(env).name
        if env == Env.predator_prey and quick:
            return cls(EnvConfig(env, 3, 5, episode_limit=20), ppo=PPOConfig(n_envs=32, updates=25))
        if env == Env.simple_spread or env not in NATIVE_ENVS:  # the Python-stepped adapters
            ppo = PPOConfig(n_envs=8, updates=6) if quick else PPOConfig(n_envs=16, updates=60)
            return cls(EnvConfig(env, agents=3) if env in NATIVE_ENVS else EnvConfig(env), ppo=ppo)
        return cls(EnvConfig(env), ppo=PPOConfig(n_envs=32, updates=20) if quick else PPOConfig())

    @classmethod
    def from_flags(cls, env: str, quick: bool, env_kwargs: dict, **flags) -> TrainConfig:
        """``gatelab comm train``'s options as a config: :meth:`preset`, then the flags given.

        ``None`` flags keep the preset's value. Options that would be ignored are refused: the
        grid-world flags with a PettingZoo module (the module decides; ``env_kwargs``), a comm
        cost or budget without temporal gates, both at once.
        """
        base = cls.preset(env, quick)
        given = {k: flags[k] for k in ("agents", "grid", "vision", "episode_limit")}
        env_changes = {k: v for k, v in given.items() if v is not None}
        if base.env.is_module:
            native_only = [k for k in ("agents", "grid", "vision") if k in env_changes]
            _check(
                not native_only,
                f"--{native_only[0] if native_only else ''}: {base.env.name} decides its own "
                "agents and world; pass its arguments with --env-arg KEY=VALUE",
            )
        cost, budget = flags["comm_cost"], flags["comm_budget"]
        _check(
            not (budget > 0 and cost > 0),
            "--comm-cost is the straight-through gates'; --comm-budget the causal",
        )
        _check(
            flags["temporal_gate"] or (cost == 0 and budget == 0),
            "--comm-cost and --comm-budget train temporal gates; add --temporal-gate",
        )
        ppo = {k: flags[k] for k in ("updates", "n_envs") if flags[k] is not None}
        return base.with_(
            env={**env_changes, "memory": flags["memory"], "env_kwargs": env_kwargs},
            model={k: flags[k] for k in ("graph", "sparsity", "temporal_gate")},
            ppo=ppo,
            gate=GateConfig.budgeted(budget) if budget else GateConfig(comm_cost=cost),
            seed=flags["seed"],
            device=flags["device"],
        )

    def to_dict(self) -> dict:
        """Nested plain JSON (Enums as their values)."""
        out = asdict(self)
        for section in ("model", "gate"):
            for key, value in out[section].items():
                if isinstance(value, Enum):
                    out[section][key] = value.value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a one-line error."""
        sections = {"env": EnvConfig, "model": ModelConfig, "ppo": PPOConfig, "gate": GateConfig}
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        _check(not unknown, f"unknown TrainConfig fields: {sorted(unknown)}")
        kwargs = {}
        for key, value in data.items():
            if key in sections:
                allowed = {f.name for f in fields(sections[key])}
                bad = set(value) - allowed
                _check(not bad, f"unknown {key} fields: {sorted(bad)}")
                kwargs[key] = sections[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def with_(self, **sections: dict) -> TrainConfig:
        """A copy with some fields of some sections changed: ``cfg.with_(ppo={"updates": 2})``."""
        changes = {}
        for key, value in sections.items():
            if isinstance(value, dict):
                changes[key] = replace(getattr(self, key), **value)
            else:
                changes[key] = value
        return replace(self, **changes)
