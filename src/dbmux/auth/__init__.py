"""Client authentication: secrets, password methods, TLS and signed auth tokens.

`generate_auth_token` is here for applications: `from dbmux.auth import generate_auth_token`.
"""

from dbmux.auth.tokens import generate_auth_token

__all__ = ["generate_auth_token"]
