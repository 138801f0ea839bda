"""`python -m siglip_dola` is the `siglip-dola` command."""
import sys

from siglip_dola.cli import main

sys.exit(main())
