"""The config: its schema check, cross-section checks, model checks, and the one resolver of every
default.
"""
