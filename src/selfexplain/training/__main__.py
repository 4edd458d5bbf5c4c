"""``python -m selfexplain.training`` / ``accelerate launch -m selfexplain.training``: see ``--help``."""

from ..cli.train import main

if __name__ == "__main__":
    main()
