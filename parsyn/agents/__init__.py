"""Agent workers: tool-calling rows of one decode batch over a shared prefix (`loop.py`)."""

from .loop import AGENT_INSTRUCTION, AGENT_SAMPLING, AgentRun, Call, Trajectory, Turn, parse_calls, run_agents

__all__ = ["AGENT_INSTRUCTION", "AGENT_SAMPLING", "AgentRun", "Call", "Trajectory", "Turn", "parse_calls", "run_agents"]
