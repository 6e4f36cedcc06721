"""`python -m stellarlab.compare <folder>`: the comparison table of every run below a folder.

The code is `stellarlab.results.compare`; this module is the command's stable name.
"""

import sys

from stellarlab.results.compare import main

if __name__ == "__main__":
    sys.exit(main())
