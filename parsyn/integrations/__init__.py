"""Bridges to agent frameworks (optional extras): `langgraph` (pip install 'parsyn[langgraph]')."""
