"""tcan_core: the library behind ComfyUI-TCAN (pose-driven human image animation).

It never imports ComfyUI; everything it needs from a host comes in as plain arguments.
Run ``python -m tcan_core --help`` for the command line.
"""

__version__ = "0.1.0"
