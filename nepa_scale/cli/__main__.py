"""``python -m nepa_scale.cli`` (torchrun and the tests run the CLI this way)."""

import sys

from nepa_scale.cli import main

sys.exit(main())
