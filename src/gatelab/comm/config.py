"""The settings of one training run: four small dataclasses and one home for the presets.

``TrainConfig(env=EnvConfig(...), model=ModelConfig(...), ppo=PPOConfig(...),
gate=GateConfig(...))``; :meth:`TrainConfig.preset` gives the full and quick settings of each
environment, and :meth:`GateConfig.budgeted` the causal gates that meet a communication budget.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class EnvConfig:
    """The task: environment, team size and what each agent observes."""

    name: Env = Env.predator_prey
    agents: int = 5  # A (IC3Net medium: 5 predators)
    grid: int = 10  # grid side (IC3Net medium: 10)
    vision: int = 1  # view radius (IC3Net medium: 1)
    episode_limit: int = 0  # 0: the environment's default (40 for a 10x10 grid)
    memory: bool = False  # append the agent's previous action (one-hot; gated: + listened) to obs

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", Env(self.name))
        _check(
            self.agents >= 2, f"agents must be >= 2 (communication needs two), got {self.agents}"
        )


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
    alpha_every: int = 2  # an alpha pass after every n-th theta epoch (2 per update)
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

    @classmethod
    def preset(cls, env: Env | str = Env.predator_prey, quick: bool = False) -> TrainConfig:
        """The settings of ``env`` used by ``comm train`` and ``comm compare``.

        Full: Predator-Prey as IC3Net's medium task (5 predators, 10x10, vision 1, limit 40),
        300 updates of 64 episodes; simple_spread with 3 agents, 60 updates of 16.
        ``quick`` (a smoke run of seconds): IC3Net's easy Predator-Prey (3 predators, 5x5,
        limit 20) for 25 updates of 32, a 6-update simple_spread, 20 updates of 32 otherwise.
        """
        env = Env(env)
        if env is Env.predator_prey and quick:
            return cls(EnvConfig(env, 3, 5, episode_limit=20), ppo=PPOConfig(n_envs=32, updates=25))
        if env is Env.simple_spread:
            ppo = PPOConfig(n_envs=8, updates=6) if quick else PPOConfig(n_envs=16, updates=60)
            return cls(EnvConfig(env, agents=3), ppo=ppo)
        return cls(EnvConfig(env), ppo=PPOConfig(n_envs=32, updates=20) if quick else PPOConfig())

    def to_dict(self) -> dict:
        """Nested plain JSON (Enums as their values)."""
        out = asdict(self)
        for section in ("env", "model", "gate"):
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
