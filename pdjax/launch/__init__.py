"""Launchers: one absl-flags program per pool, plus ``local`` (everything on
this machine)."""
