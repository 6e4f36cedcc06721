"""A model added from outside stellarlab: one module and one config file (`hydra.searchpath` finds the file)."""
