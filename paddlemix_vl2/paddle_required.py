"""Imported first by the modules that build on Paddle: importing it runs ``paddle_version.require_paddle``,
so a missing or too old Paddle is named in one line before anything else fails on it."""
from .paddle_version import require_paddle

require_paddle()
