"""Runtime: token generation and sampling."""
