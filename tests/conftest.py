"""Test-wide settings."""

from hypothesis import settings

# Properties are checked, not timed: a loaded CI machine must not turn a slow example into a
# failure (hypothesis' default 200 ms deadline did exactly that).
settings.register_profile("streamrec", deadline=None)
settings.load_profile("streamrec")
