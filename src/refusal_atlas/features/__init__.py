"""Refusal features: the refusal direction, LA-IG attribution, and the selectors that rank latents.

"""
