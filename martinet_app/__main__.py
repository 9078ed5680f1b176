"""``python -m martinet_app``: the ``martinet`` command.

``martinet _slot FD SPEC`` (a worker's handler process, see runner.py) skips the command line
parser: a worker starts one per slot, and importing click would add to each start.
"""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["_slot"] and len(sys.argv) == 4:
        import json

        from martinet_app import runner

        runner.main(int(sys.argv[2]), json.loads(sys.argv[3]))
    else:
        from martinet_app.cli import main

        main(prog_name="martinet")
