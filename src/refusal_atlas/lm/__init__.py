"""The language model: sources, loading and chat formatting, generation, activations,
interventions, the refusal organism.
"""
