"""Secrets out of everything ntf-ray writes: the terminal, its log files, its outputs.

``redact(text)`` removes two kinds of thing:

- the values of the credentials in use, as botocore finds them without asking the network
  (the environment, the shared credentials and config files with every profile in them, so
  a role's source profile too, the legacy boto files), every ``AWS_*`` variable whose name
  says key, secret, token or password, the web-identity and container token files, and the
  password of an endpoint URL;
- what looks like a credential whatever its source, for those only the network gives
  (an instance role, a container role, SSO, an assumed role, a credential process):
  AWS key ids, the security-token header and query value, the credential and signature of
  an ``Authorization`` header or a presigned URL, ``aws_secret_access_key=...`` and the
  like, STS and metadata-service answers, and the ``user:password@`` of any URL.

``installed()`` puts ``redact`` in front of every log record the process makes (any
library's, at any level, whichever handler writes it: records are redacted as they are
made) and of ``sys.stdout`` and ``sys.stderr``; ``ray_console`` applies it to Ray's worker
lines and to the log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote, urlsplit

MASK = "<redacted>"
#: Shorter values are not redacted wherever they occur: every AWS key id (16+), secret (40)
#: and token is longer, and "minio" or "admin" would take words out of every line.
MIN_SECRET = 8
#: botocore's ways to credentials that read files only (the others ask the network or run a command).
LOCAL_PROVIDERS = ("env", "shared-credentials-file", "config-file", "ec2-credentials-file", "boto-config")
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
_TOKEN_FILES = ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
_ENDPOINTS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_STS")
_PROFILE_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_security_token")

_VALUE = r"[^\s'\"&,;}<>]+"
# name: value, name=value, 'name': b'value', "name": "value"; atomic, so that a value already
# redacted is left alone rather than matched from its quote on
_ASSIGN = r"(?>['\"]?\s*[:=]\s*(?:b?['\"])?)"
PATTERNS: list[tuple[re.Pattern, str]] = [
    # access key ids (AKIA long-term, ASIA temporary) and the other unique-id prefixes
    (re.compile(r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA|ABIA|ACCA)[A-Z0-9]{12,}\b"), MASK),
    # headers and query parameters: the token, a presigned URL's credential and signature, an SSE-C key
    (re.compile(r"(?i)(x-amz-(?:security-token|credential|signature|server-side-encryption-customer-key)"
                rf"{_ASSIGN}){_VALUE}"), rf"\1{MASK}"),
    # Authorization: AWS4-HMAC-SHA256 Credential=AKID/scope, SignedHeaders=..., Signature=hex
    (re.compile(r"\b(Credential=)[^\s,'\"&]+"), rf"\1{MASK}"),
    (re.compile(r"\b(Signature=)[^\s,'\"&]+"), rf"\1{MASK}"),
    (re.compile(r"\b(Signature:\s*)[0-9a-f]{64}\b"), rf"\1{MASK}"),  # botocore.auth's debug line
    (re.compile(rf"(?i)(authorization{_ASSIGN})(AWS|Bearer|Basic)\s+[^\s'\",]+"), rf"\1\2 {MASK}"),
    # key=value forms: config files, environment dumps, s3fs's call arguments, JSON answers
    (re.compile(r"(?i)((?:aws_)?(?:secret_access_key|session_token|security_token|secret_key|access_key_id)"
                rf"|SecretAccessKey|SessionToken|AccessKeyId|SSECustomerKey|WebIdentityToken){_ASSIGN}{_VALUE}"),
     None),
    (re.compile(r"(?i)([\"']token[\"']\s*:\s*[\"'])[^\"']+"), rf"\1{MASK}"),  # the metadata service's JSON
    (re.compile(r"<(SecretAccessKey|SessionToken|AccessKeyId|WebIdentityToken)>[^<]*</"), rf"<\1>{MASK}</"),
    # user:password@ (or a token@) in any URL
    (re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"<>?#]+@"), rf"\1{MASK}@"),
]


def _key_value(match: re.Match) -> str:
    text = match.group(0)
    name = match.group(1)
    rest = text[len(name):]
    value = re.match(_ASSIGN, rest)
    return name + (value.group(0) if value else "") + MASK


class _Secrets:
    """The values to redact, found once per environment (a test or a notebook may change it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()  # resolving: botocore logs as it reads, and its records come here
        self._key: tuple | None = None
        self._pattern: re.Pattern | None = None

    def pattern(self) -> re.Pattern | None:
        key = _environment_key()
        if key == self._key:
            return self._pattern
        if getattr(self._local, "resolving", False):
            return _compile(_environment_values())  # no file read, no recursion
        with self._lock:
            if key != self._key:
                self._local.resolving = True
                try:
                    self._pattern = _compile(_environment_values() | _file_values())
                finally:
                    self._local.resolving = False
                self._key = key
            return self._pattern


def _environment_key() -> tuple:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_") or k == "HOME"))


def _environment_values() -> set[str]:
    values = {v for k, v in os.environ.items()
              if k.startswith("AWS_") and _SECRET_NAME.search(k) and not k.endswith("_FILE")}  # a path
    for name in _ENDPOINTS:
        values |= url_secrets(os.environ.get(name))
    return values


def url_secrets(url: str | None) -> set[str]:
    """The password (and a user long enough to be a key) in ``scheme://user:password@host``."""
    if not url or "@" not in url:
        return set()
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return set()
    return {unquote(v) for v in (user, password) if v} | {v for v in (user, password) if v}


def _file_values() -> set[str]:
    values: set[str] = set()
    for name in _TOKEN_FILES:
        path = os.environ.get(name)
        if path:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                with open(os.path.expanduser(path), encoding="utf-8") as f:
                    values.add(f.read(1 << 16).strip())
    with contextlib.suppress(Exception):  # no botocore, a broken config: the patterns still hold
        values |= _botocore_values()
    return values


def _botocore_values() -> set[str]:
    """The credentials botocore would sign with, where files give them, and every profile's keys."""
    import botocore.configloader
    import botocore.credentials
    import botocore.session

    session = botocore.session.Session()
    values: set[str] = set()
    with contextlib.suppress(Exception):  # a profile named but missing, a malformed file
        resolver = botocore.credentials.create_credential_resolver(session)
        local = [p for p in resolver.providers if getattr(p, "METHOD", None) in LOCAL_PROVIDERS]
        creds = botocore.credentials.CredentialResolver(local).load_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            values |= {frozen.access_key, frozen.secret_key, frozen.token}
    for variable in ("credentials_file", "config_file"):
        with contextlib.suppress(Exception):
            path = os.path.expanduser(session.get_config_variable(variable))
            if os.path.isfile(path):
                for profile in botocore.configloader.raw_config_parse(path).values():
                    values |= {str(profile.get(k)) for k in _PROFILE_KEYS if profile.get(k)}
                    values |= url_secrets(profile.get("endpoint_url"))
    return {v for v in values if v}


def _compile(values: set[str]) -> re.Pattern | None:
    forms = {v.strip() for v in values if v and len(v.strip()) >= MIN_SECRET}
    forms |= {quote(v, safe="") for v in forms}  # as a URL's query carries it
    if not forms:
        return None
    return re.compile("|".join(re.escape(v) for v in sorted(forms, key=len, reverse=True)))


_secrets = _Secrets()


def redact(text: str) -> str:
    """``text`` without the credentials in use or anything that looks like one (see the module)."""
    if not text:
        return text
    values = _secrets.pattern()
    if values is not None:
        text = values.sub(MASK, text)
    for pattern, replacement in PATTERNS:
        text = pattern.sub(replacement or _key_value, text)
    return text


# ---------------------------------------------------------------------- where it is applied
def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """The record with its message, traceback and stack redacted, as every handler will write it."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging reports it when a handler formats it
        return record
    record.msg, record.args = redact(message), ()
    if record.exc_info and not record.exc_text:
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


class RedactingStream:
    """A text stream that writes ``redact(text)`` to the stream it wraps (``sys.stderr``, ...)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, buffer, ...
        return getattr(self.stream, name)


def _excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, tb))))


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Redact every log record made and everything written to ``sys.stdout`` / ``sys.stderr``
    while the block runs (one command), and a traceback that ends the process."""
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    streams = {name: getattr(sys, name) for name in ("stdout", "stderr")}
    for name, stream in streams.items():
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
    # An exception no one catches is printed after the block, as the process ends: the hook stays.
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _excepthook
    try:
        yield
    finally:
        if logging.getLogRecordFactory() is factory:
            logging.setLogRecordFactory(previous)
        for name, stream in streams.items():
            current = getattr(sys, name)
            if isinstance(current, RedactingStream) and current.stream is stream:
                setattr(sys, name, stream)
