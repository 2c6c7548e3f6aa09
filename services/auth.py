"""Shared-token auth: the one place a token is read from the environment, and the check a call must pass.

An application with `auth_token_env` requires gRPC metadata `authorization: Bearer <token>`; the trainer and the CLI
send the token they read from the variable they are given. The server side (`load_auth_token`, `auth_problem`) is
used by `services.admission`, which admits every call of every application the same way.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from typing import Any


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


def load_auth_token(env_name: str | None) -> bytes | None:
    """A replica's shared token, from the environment variable `env_name`; None when auth is off.

    Missing or empty raises RuntimeError: the replica fails to start, naming the variable, rather than serve openly.
    """
    hint = " in the replica; set it in the environment of every Ray node (for example from a Kubernetes Secret)"
    token = token_from_env(env_name, "auth_token_env", hint=hint, error=RuntimeError)
    return None if token is None else token.encode()


def auth_problem(metadata: Sequence[tuple[str, Any]], token: bytes) -> str | None:
    """Why a call's metadata does not authenticate against `token`, or None when it does."""
    values = [v for k, v in metadata if k == "authorization"]
    if not values:
        return "missing token: this application requires the metadata 'authorization: Bearer <token>'"
    scheme, _, given = str(values[0]).strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "malformed authorization metadata: expected 'Bearer <token>'"
    # Constant-time comparison: the time taken does not reveal how much of the token matched.
    if not hmac.compare_digest(given.strip().encode(), token):
        return "invalid token"
    return None
