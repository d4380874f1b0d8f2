"""``python -m fair_calib_llmc``: the ``fair-calib-llmc`` command."""

import sys

from fair_calib_llmc_cli import main

sys.exit(main())
