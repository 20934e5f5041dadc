"""The `mixkit` console script.

A module of its own, outside the package, so that a Ctrl-C while `mixkit`
and torch are still importing (the first second or two of every command)
ends the command quietly with 130, as it does once `mixkit.cli` runs.
"""

import sys


def main():
    try:
        from mixkit.cli import exit_process, main as run
    except KeyboardInterrupt:
        return 130  # mixkit.cli.EXIT_CTRL_C, which is not importable yet
    exit_process(run())


if __name__ == "__main__":
    sys.exit(main())
