"""Who is calling over HTTP: bearer tokens from the database, JWT access tokens from an OAuth issuer, and the
configuration file that maps each identity to the caller role it acts as.

Two kinds of bearer token reach the gateway (``serve --identity-config FILE``):

* a token the admin issued (``mcp-hotmesh tokens add NAME --role ROLE``): 256 random bits, stored as its sha256
  in ``<schema>.tokens``. The gateway looks each request's token up through ``caller_identity()`` (one indexed
  read, measured at about 0.2 ms), so a revoked token is refused on its next request;
* a JWT access token (OAuth 2.1 resource server): its signature is checked against the issuer's JWKS with PyJWT
  (algorithms pinned, ``alg: none`` never accepted), then its issuer, audience and expiry; its claims are mapped
  to a caller role by the ``[[oauth.roles]]`` rules, first match wins. Keys are cached and fetched again for an
  unknown key id, at most once per ``JWKS_MIN_REFRESH`` seconds (a stream of made-up key ids costs the issuer
  nothing).

Either way the result is an ``Identity`` (the SDK's ``AccessToken`` with a name and a caller role), or None: the
SDK then answers 401 with ``WWW-Authenticate``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx2
import jwt
from mcp.server.auth.provider import AccessToken, TokenVerifier
from pydantic import SecretStr

from ._config import check_schema
from ._postgres import translated
from .errors import ConfigError, Conflict, NotFound

log = logging.getLogger(__name__)

TOKEN_PREFIX = "hm_"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
JWKS_MIN_REFRESH = 10.0
"""Seconds between two fetches of the JWKS for an unknown key id."""
JWKS_MAX_AGE = 3600.0
"""Seconds a fetched JWKS is used before it is fetched again (keys rotate)."""
LEEWAY = 30
"""Seconds of clock difference allowed on exp and nbf."""
SAFE_ALGORITHMS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
"""Asymmetric algorithms only: a JWKS holds public keys, and an HMAC key in one would make a secret public."""


# --------------------------------------------------------------------------------------- bearer tokens
def new_token() -> str:
    """A fresh bearer token: 256 random bits."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    """What is stored of a token: its sha256 (the token has 256 random bits, so no salt or slow hash is needed)."""
    return hashlib.sha256(token.encode()).digest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"invalid identity name {name!r}: letters, digits and . _ @ + -, at most 128")
    return name


@dataclass(frozen=True)
class TokenInfo:
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "role": self.role, "created_at": self.created_at.isoformat(),
                "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None}


async def add_token(conn: asyncpg.Connection, name: str, role: str, *, schema: str = "hotmesh") -> str:
    """Issue a token for ``name`` acting as the caller role ``role``; returns the token (stored only hashed). A
    revoked name may be issued again."""
    schema = check_schema(schema)
    check_name(name)
    with translated():
        exists = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", role)
        is_caller = exists and await conn.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", role, f"{schema}_caller")
        if not is_caller:
            raise ConfigError(f"{role!r} is not a caller role of schema {schema!r} "
                              "(mcp-hotmesh provision --kind caller makes one)")
        token = new_token()
        done = await conn.fetchval(
            f'INSERT INTO "{schema}".tokens AS t (name, role_name, token_hash) VALUES ($1, $2, $3) '
            "ON CONFLICT (name) DO UPDATE SET role_name = excluded.role_name, token_hash = excluded.token_hash, "
            "created_at = now(), revoked_at = NULL WHERE t.revoked_at IS NOT NULL RETURNING true",
            name, role, token_hash(token))
    if not done:
        raise Conflict(f"identity {name!r} already has a token: revoke it first (mcp-hotmesh tokens revoke {name})")
    return token


async def list_tokens(conn: asyncpg.Connection, *, schema: str = "hotmesh") -> list[TokenInfo]:
    schema = check_schema(schema)
    with translated():
        rows = await conn.fetch(f'SELECT name, role_name, created_at, revoked_at FROM "{schema}".tokens ORDER BY name')
    return [TokenInfo(r["name"], r["role_name"], r["created_at"], r["revoked_at"]) for r in rows]


async def revoke_token(conn: asyncpg.Connection, name: str, *, schema: str = "hotmesh") -> None:
    """Revoke ``name``'s token: refused from its next request on."""
    schema = check_schema(schema)
    with translated():
        done = await conn.fetchval(
            f'UPDATE "{schema}".tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL RETURNING true',
            name)
    if not done:
        raise NotFound(f"no unrevoked token named {name!r}")


# ------------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class RoleRule:
    """Claims that map to a caller role: ``claim`` (``scope`` is split on spaces; a list claim matches any
    element) holding ``value``."""

    claim: str
    value: str
    role: str

    def matches(self, claims: dict[str, Any]) -> bool:
        found = claims.get(self.claim)
        if isinstance(found, str):
            values = found.split() if self.claim in ("scope", "scp") else [found]
        elif isinstance(found, list):
            values = [v for v in found if isinstance(v, str)]
        else:
            return False
        return self.value in values


@dataclass(frozen=True)
class OAuthSettings:
    issuer: str
    audience: str
    jwks_url: str
    resource: str  # the public URL of /mcp, advertised in the protected-resource metadata
    algorithms: tuple[str, ...] = ("RS256",)
    identity_claim: str = "sub"
    roles: tuple[RoleRule, ...] = ()


@dataclass(frozen=True)
class QuotaRule:
    """Per identity and tool (``*`` and shell patterns match several): calls per second with a burst, and calls
    at once. A rule whose ``tool`` is ``*`` counts all of an identity's calls together."""

    identity: str = "*"
    tool: str = "*"
    rate: float | None = None
    burst: float | None = None
    concurrent: int | None = None


@dataclass(frozen=True)
class IdentityConfig:
    """The file the admin writes for ``serve --identity-config``."""

    logins: dict[str, SecretStr] = field(default_factory=dict)  # caller role -> its password
    oauth: OAuthSettings | None = None
    quotas: tuple[QuotaRule, ...] = ()
    audit_arguments: bool = False
    max_roles: int = 16
    pool_size: int = 4
    idle_seconds: float = 300.0


def _table(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table")
    return data


def _str(data: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return value


def _number(data: dict[str, Any], key: str, where: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive number")
    return float(value)


def parse_config(data: dict[str, Any], *, source: str = "the identity configuration") -> IdentityConfig:
    known = {"logins", "oauth", "quotas", "audit", "pools"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(known))})")
    logins: dict[str, SecretStr] = {}
    for role, entry in _table(data.get("logins", {}), f"{source}: [logins]").items():
        entry = _table(entry, f"{source}: [logins.{role}]")
        if "password_env" in entry:
            var = _str(entry, "password_env", f"[logins.{role}]")
            if not os.environ.get(var):
                raise ConfigError(f"{source}: [logins.{role}] reads its password from ${var}, which is not set")
            logins[role] = SecretStr(os.environ[var])
        else:
            logins[role] = SecretStr(_str(entry, "password", f"[logins.{role}]"))
    oauth = None
    if "oauth" in data:
        o = _table(data["oauth"], f"{source}: [oauth]")
        where = f"{source}: [oauth]"
        algorithms = o.get("algorithms", ["RS256"])
        if (not isinstance(algorithms, list) or not algorithms
                or any(a not in SAFE_ALGORITHMS for a in algorithms)):
            raise ConfigError(f"{where}: algorithms must be a list of {', '.join(sorted(SAFE_ALGORITHMS))}")
        rules = []
        for i, r in enumerate(o.get("roles", [])):
            r = _table(r, f"{where} roles[{i}]")
            rules.append(RoleRule(_str(r, "claim", f"{where} roles[{i}]"), _str(r, "value", f"{where} roles[{i}]"),
                                  _str(r, "role", f"{where} roles[{i}]")))
        if not rules:
            raise ConfigError(f"{where}: give at least one [[oauth.roles]] rule (claim, value, role)")
        resource = _str(o, "resource", where)
        oauth = OAuthSettings(issuer=_str(o, "issuer", where), audience=_str(o, "audience", where, resource),
                              jwks_url=_str(o, "jwks_url", where), resource=resource, algorithms=tuple(algorithms),
                              identity_claim=_str(o, "identity_claim", where, "sub"), roles=tuple(rules))
    quotas = []
    raw_quotas = data.get("quotas", [])
    if not isinstance(raw_quotas, list):
        raise ConfigError(f"{source}: quotas must be an array of tables ([[quotas]])")
    for i, q in enumerate(raw_quotas):
        where = f"{source}: quotas[{i}]"
        q = _table(q, where)
        rate, burst, concurrent = _number(q, "rate", where), _number(q, "burst", where), _number(q, "concurrent", where)
        if rate is None and concurrent is None:
            raise ConfigError(f"{where}: give rate (calls per second) or concurrent (calls at once), or both")
        quotas.append(QuotaRule(identity=_str(q, "identity", where, "*"), tool=_str(q, "tool", where, "*"),
                                rate=rate, burst=burst if burst is not None else rate,
                                concurrent=int(concurrent) if concurrent is not None else None))
    audit = _table(data.get("audit", {}), f"{source}: [audit]")
    pools = _table(data.get("pools", {}), f"{source}: [pools]")
    return IdentityConfig(
        logins=logins, oauth=oauth, quotas=tuple(quotas), audit_arguments=bool(audit.get("arguments", False)),
        max_roles=int(_number(pools, "max_roles", "[pools]") or 16),
        pool_size=int(_number(pools, "size", "[pools]") or 4),
        idle_seconds=_number(pools, "idle_seconds", "[pools]") or 300.0,
    )


def load_config(path: Path) -> IdentityConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the identity configuration {str(path)!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the identity configuration {str(path)!r} is not valid TOML: {exc}") from None
    return parse_config(data, source=str(path))


# ------------------------------------------------------------------------------------------ verification
class Identity(AccessToken):
    """A verified bearer token: who (``name``), acting as which caller role, and how it was proved."""

    name: str
    role: str
    source: str  # "token" or "jwt"


class Jwks:
    """The issuer's public keys, fetched when a token names a key id not in hand (rate-limited) and when stale."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched = -float("inf")
        self._lock = anyio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        now = time.monotonic()
        if kid not in self._keys or now - self._fetched > JWKS_MAX_AGE:
            async with self._lock:
                if (kid not in self._keys and time.monotonic() - self._fetched >= JWKS_MIN_REFRESH) or (
                        time.monotonic() - self._fetched > JWKS_MAX_AGE):
                    await self._fetch()
        return self._keys.get(kid)

    async def _fetch(self) -> None:
        self._fetched = time.monotonic()
        try:
            async with httpx2.AsyncClient(timeout=5) as http:
                response = await http.get(self.url)
                response.raise_for_status()
                data = response.json()
            keys: dict[str | None, jwt.PyJWK] = {}
            for entry in data.get("keys", []):
                if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                    continue
                try:
                    keys[entry.get("kid")] = jwt.PyJWK(entry)
                except jwt.PyJWTError:
                    continue  # a key type this installation cannot use: the others still serve
            self._keys = keys
            log.info("fetched %d signing key(s) from the JWKS", len(keys))
        except Exception as exc:  # the issuer is away: keep the keys in hand
            log.warning("could not fetch the JWKS from %s: %s", self.url, exc)


class IdentityVerifier(TokenVerifier):
    """The gateway's ``TokenVerifier``: admin-issued tokens through ``caller_identity()``, JWTs through the JWKS."""

    def __init__(self, pool: asyncpg.Pool | asyncpg.Connection, schema: str, oauth: OAuthSettings | None) -> None:
        self.pool = pool
        self.schema = check_schema(schema)
        self.oauth = oauth
        self.jwks = Jwks(oauth.jwks_url) if oauth is not None else None

    async def verify_token(self, token: str) -> AccessToken | None:
        if self.oauth is not None and token.count(".") == 2 and not token.startswith(TOKEN_PREFIX):
            return await self._verify_jwt(token)
        try:
            with translated():
                row = await self.pool.fetchrow(
                    f'SELECT name, role_name FROM "{self.schema}".caller_identity($1)', token_hash(token))
        except Exception as exc:
            log.warning("could not look the bearer token up: %s", exc)
            return None
        if row is None:
            log.info("refused a bearer token: unknown or revoked")
            return None
        return Identity(token=token, client_id=row["name"], subject=row["name"], scopes=[], name=row["name"],
                        role=row["role_name"], source="token")

    async def _verify_jwt(self, token: str) -> Identity | None:
        oauth, jwks = self.oauth, self.jwks
        assert oauth is not None and jwks is not None
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") not in oauth.algorithms:  # "none" and HMAC are never in the list
                raise jwt.InvalidAlgorithmError(f"algorithm {header.get('alg')!r} is not accepted")
            key = await jwks.key(header.get("kid"))
            if key is None:
                raise jwt.InvalidKeyError("the token's key is not in the issuer's key set")
            claims = jwt.decode(token, key=key, algorithms=list(oauth.algorithms), audience=oauth.audience,
                                issuer=oauth.issuer, leeway=LEEWAY,
                                options={"require": ["exp", "iss", "aud", oauth.identity_claim]})
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:  # also a key of the wrong type for the alg
            log.info("refused a JWT: %s", exc)
            return None
        who = claims.get(oauth.identity_claim)
        if not isinstance(who, str) or not who:
            log.info("refused a JWT: claim %r is not a string", oauth.identity_claim)
            return None
        role = next((r.role for r in oauth.roles if r.matches(claims)), None)
        if role is None:
            log.info("refused a JWT of %r: no rule maps its claims to a caller role", who[:200])
            return None
        scope = claims.get("scope")
        return Identity(token=token, client_id=str(claims.get("client_id") or claims.get("azp") or who),
                        subject=who, scopes=scope.split() if isinstance(scope, str) else [],
                        expires_at=int(claims["exp"]), claims={"iss": claims["iss"]}, name=who[:200], role=role,
                        source="jwt")
