"""What the ``fair-calib-llmc`` commands do (:mod:`.commands`); the argument parser lives in
``fair_calib_llmc_cli`` outside the package, so ``--help`` imports nothing heavy."""
