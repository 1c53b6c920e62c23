"""Steering: the condition grammar and the SAE feature clamp."""
