"""``python -m resctl``."""

from resctl.main import main

main()
