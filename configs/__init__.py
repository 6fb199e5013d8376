"""Pieces shared by the transfer configs in transfers/ (plain Python, ml_collections)."""
