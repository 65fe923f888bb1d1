"""One module per `micro-arch` command, each a function with named parameters; only micro_arch.cli sees argparse."""
