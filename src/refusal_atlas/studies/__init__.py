"""The studies built on refusal features: jailbreaks, probes, guardrails, categories, circuits,
modularity, dashboards.
"""
