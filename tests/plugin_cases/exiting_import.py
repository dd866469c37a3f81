"""A plugin module that calls `sys.exit(0)` while it is imported, as a script's guard might."""

import sys

sys.exit(0)
