"""Downloads: survey files fetched into the folders the `data` config reads, resumable and verified.

`python -m stellarlab.download data=apogee` (the command, `command.py`) picks the survey's recipe; `fetch.py`
streams files in parallel with retries, HTTP range resumption and checksums.
"""
