"""MoE²: gated collaborative inference over edge LLM servers (Jin et al. 2025, papers.md §3).

Serving (``serving``, ``server``), the OpenAI-compatible client with modelled device costs
(``client``), questions (``data``), answer collection (``collect``), the gate (``model``,
``train``), the exact subset selector (``select``), budget sweeps (``eval``, ``sweep``) and the
live router (``router``).
"""

from gatelab.edge.client import (
    PROFILES,
    DeviceProfile,
    EdgeExpert,
    ExpertAnswer,
    ExpertError,
    ExpertTimeout,
    ask_experts,
    continuation_distribution,
    option_distribution,
)
from gatelab.edge.data import (
    MCQuestion,
    format_cloze,
    format_prompt,
    generate_suite,
    load_mmlu,
    split_questions,
)
from gatelab.edge.model import EdgeGate, GateConfig, embed_texts, mixture
from gatelab.edge.select import (
    Selection,
    brute_force_subset,
    delay_cost,
    energy_cost,
    monotone_hull,
    select_subset,
)
from gatelab.edge.train import GateData, TrainConfig, train_gate

__all__ = [
    "PROFILES",
    "DeviceProfile",
    "EdgeExpert",
    "EdgeGate",
    "ExpertAnswer",
    "ExpertError",
    "ExpertTimeout",
    "GateConfig",
    "GateData",
    "MCQuestion",
    "Selection",
    "TrainConfig",
    "ask_experts",
    "brute_force_subset",
    "continuation_distribution",
    "delay_cost",
    "embed_texts",
    "energy_cost",
    "format_cloze",
    "format_prompt",
    "generate_suite",
    "load_mmlu",
    "mixture",
    "monotone_hull",
    "option_distribution",
    "select_subset",
    "split_questions",
    "train_gate",
]
