"""``python -m martinet_app``: the ``martinet`` command."""

from martinet_app.cli import main

if __name__ == "__main__":
    main(prog_name="martinet")
