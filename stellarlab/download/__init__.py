"""Downloads: survey files fetched into the folders the `data` config reads, resumable and verified.

`python -m stellarlab.download data=apogee` (the command, `command.py`) runs the recipe of the survey the
data config names (recipes live with the survey's code, e.g. `stellarlab.data.apogee.download`, and are
found through `stellarlab.data.surveys`); `fetch.py` streams files in parallel with retries, HTTP range
resumption and checksums, and collects what happened in a `Report`.
"""
