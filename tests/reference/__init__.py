"""Small float64 reference implementations written from ../shared/specs (not from any oracle's code)."""
