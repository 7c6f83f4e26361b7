"""MoE²: gated collaborative inference over edge LLM servers (Jin et al. 2025, arXiv:2501.09410).

Serving (``names``: the model-name grammar, ``weights``: GGUF loading and truncation, ``served``:
the served model, ``server``: the HTTP app), the OpenAI-compatible client (``client``) and the
server dialects it speaks (``backends``: gatelab, llama.cpp, OpenAI/vLLM; ``llama_server``
locates and runs llama.cpp's server), modelled device costs and FLOPs (``costs``), the experts
file (``experts``), questions (``data``), answer collection (``collect``), the gate (``model``,
``train``), the exact subset selector (``select``), budget sweeps (``eval``, ``sweep``) and the
live router (``router``).
"""

from gatelab.edge.client import (
    EdgeExpert,
    ExpertAnswer,
    ExpertError,
    ExpertTimeout,
    ask_experts,
    continuation_distribution,
    option_distribution,
)
from gatelab.edge.costs import PROFILES, DeviceProfile, llama_forward_flops
from gatelab.edge.data import (
    MCQuestion,
    format_cloze,
    format_prompt,
    generate_suite,
    load_mmlu,
    split_questions,
)
from gatelab.edge.experts import DEFAULT_POOL, load_experts
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
    "DEFAULT_POOL",
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
    "llama_forward_flops",
    "load_experts",
    "generate_suite",
    "load_mmlu",
    "mixture",
    "monotone_hull",
    "option_distribution",
    "select_subset",
    "split_questions",
    "train_gate",
]
