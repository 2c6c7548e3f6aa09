"""Shared-token auth: the one place a token is read from the environment, and the check a call must pass.

An application with `auth_token_env` requires gRPC metadata `authorization: Bearer <token>`; the trainer and the CLI
send the token they read from the variable they are given.
"""

from __future__ import annotations

import os


def token_from_env(env_name: str | None, what: str, hint: str = "", error: type[Exception] = ValueError) -> str | None:
    """The token held by the environment variable `env_name` (stripped); None when `env_name` is None.

    An unset or empty variable raises `error` naming `what` (the setting that named the variable) and ending with
    `hint`, since a configured token that is missing must fail loudly rather than send no token.
    """
    if env_name is None:
        return None
    token = os.environ.get(env_name, "").strip()
    if not token:
        raise error(f"{what} is {env_name!r} but that environment variable is unset or empty{hint}")
    return token
