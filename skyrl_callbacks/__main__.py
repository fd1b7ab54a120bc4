"""``python -m skyrl_callbacks``: the ``skyrl-ckpt`` command-line tool (see ``skyrl_callbacks.cli``)."""

from skyrl_callbacks.cli import console_main

if __name__ == "__main__":
    console_main()
