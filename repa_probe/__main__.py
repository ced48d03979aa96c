"""``python -m repa_probe`` (and ``torchrun -m repa_probe``) runs the command-line interface."""
from repa_probe.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
