"""vac: a VM factory daemon for grid computing sites (the vacuum model)."""

__version__ = "04.00.00"
