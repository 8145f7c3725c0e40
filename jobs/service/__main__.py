"""``python -m jobs.service ...`` = ``moe-pretrain ...``: the entrypoint of submitted jobs.

A Ray job runs from a copy of the working directory, where the package may
not be installed as a console script; ``-m`` puts that copy first on the path.
"""

from jobs.cli import main

main()
