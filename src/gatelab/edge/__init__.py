"""MoE²: gated collaborative inference over edge LLM servers (Jin et al. 2025, papers.md §3)."""
