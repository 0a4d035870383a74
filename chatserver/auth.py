"""Client tokens: HS256 JWTs through PyJWT, and the dev auth mode."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jwt

from protocol import Tier, UserRole

if TYPE_CHECKING:
    from .settings import Settings

TIERS = frozenset(t.value for t in Tier)
ROLES = frozenset(r.value for r in UserRole)
MAX_USER_ID = 64


class AuthError(Exception):
    """The token is missing, malformed, badly signed, expired or carries bad claims."""


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    tier: str = Tier.FREE.value
    role: str = UserRole.USER.value


class Authenticator:
    """Issues and verifies tokens. Without a configured secret it runs in dev mode."""

    def __init__(
        self,
        secret: str | None,
        previous: str | None = None,
        leeway_s: int = 30,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        max_lifetime_s: int | None = None,
    ) -> None:
        self.dev_mode = secret is None
        # A fresh secret per run: dev tokens die with the process.
        self._secret = secret if secret is not None else secrets.token_urlsafe(32)
        # During a rotation tokens signed with the old secret stay valid until they expire.
        self._accepted = [self._secret] + ([previous] if previous else [])
        self._leeway_s = leeway_s
        self.audience = audience
        self.issuer = issuer
        # A stolen token is good until it expires: bound how far ahead an issuer may set exp.
        self.max_lifetime_s = max_lifetime_s

    def issue(
        self,
        user_id: str,
        tier: str = Tier.FREE.value,
        role: str = UserRole.USER.value,
        ttl_s: int = 3600,
    ) -> str:
        check_claims(user_id, tier, role)
        if self.max_lifetime_s is not None:
            ttl_s = min(ttl_s, self.max_lifetime_s)  # else verify would refuse the token
        now = int(time.time())
        claims: dict[str, object] = {
            "sub": user_id,
            "tier": tier,
            "role": role,
            "iat": now,
            "exp": now + ttl_s,
        }
        if self.audience is not None:
            claims["aud"] = self.audience
        if self.issuer is not None:
            claims["iss"] = self.issuer
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def verify(self, token: str) -> Principal:
        claims: dict[str, object] | None = None
        required = ["exp", "sub"]
        if self.audience is not None:
            required.append("aud")
        if self.issuer is not None:
            required.append("iss")
        for index, secret in enumerate(self._accepted):
            try:
                # Without a configured audience PyJWT refuses any token carrying aud: skip
                # that check then (an issuer may add aud before the servers check it).
                claims = jwt.decode(
                    token,
                    secret,
                    algorithms=["HS256"],  # only HS256: 'none' and key confusion are refused
                    options={"require": required, "verify_aud": self.audience is not None},
                    leeway=self._leeway_s,
                    audience=self.audience,
                    issuer=self.issuer,
                )
                break
            except jwt.InvalidSignatureError:
                if index == len(self._accepted) - 1:
                    raise AuthError("invalid token: InvalidSignatureError") from None
            except jwt.ExpiredSignatureError:
                raise AuthError("token expired") from None
            except jwt.PyJWTError as exc:
                raise AuthError(f"invalid token: {type(exc).__name__}") from None
        assert claims is not None
        self._check_lifetime(claims)
        user_id = claims.get("sub")
        tier = claims.get("tier", Tier.FREE.value)
        role = claims.get("role", UserRole.USER.value)
        if not isinstance(user_id, str) or not isinstance(tier, str) or not isinstance(role, str):
            raise AuthError("invalid token claims")
        check_claims(user_id, tier, role)
        return Principal(user_id, tier, role)

    def _check_lifetime(self, claims: dict[str, object]) -> None:
        if self.max_lifetime_s is None:
            return
        # Without iat the lifetime left is what counts: a token may still not reach further
        # ahead than the cap. (PyJWT checked that iat, when there, is a number not ahead of now.)
        exp, iat = claims.get("exp"), claims.get("iat", time.time())
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise AuthError("invalid token claims")
        if exp - iat > self.max_lifetime_s:
            raise AuthError(f"token lifetime over {self.max_lifetime_s} s")


def authenticator(settings: Settings) -> Authenticator:
    auth = settings.auth
    return Authenticator(
        auth.secret,
        auth.previous_secret,
        auth.leeway_s,
        audience=auth.audience,
        issuer=auth.issuer,
        max_lifetime_s=auth.max_lifetime_s,
    )


def check_claims(user_id: str, tier: str, role: str) -> None:
    if not user_id or len(user_id) > MAX_USER_ID:
        raise AuthError(f"user id must be 1..{MAX_USER_ID} characters")
    if tier not in TIERS:
        raise AuthError(f"unknown tier {tier[:32]!r}")
    if role not in ROLES:
        raise AuthError(f"unknown role {role[:32]!r}")


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
