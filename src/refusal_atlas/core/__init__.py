"""Foundations every layer uses: atomic writers and bootstrap rates with n and interval."""
