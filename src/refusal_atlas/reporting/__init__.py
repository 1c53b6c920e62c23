"""Figures that name their model, data, judge and n."""
