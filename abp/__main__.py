"""``python -m abp`` (also what ``torchrun -m abp`` runs)."""
import sys

from abp.cli import main

sys.exit(main())
