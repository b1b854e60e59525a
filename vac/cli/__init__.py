"""Command-line faces: vac, check-vacd and vac simulate."""
