"""`python -m stellarlab.download ...`: see `stellarlab.download.command`."""

from stellarlab.download.command import main

main()
