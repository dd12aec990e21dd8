"""What an image says about where it came from, read from the bytes the detector scores.

Evidence beside the detector's score, never part of it, read from the image's metadata and
never from its pixels (``images.metadata``: only the formats ``decode`` opens, and only within
its limits: an image ``decode`` refuses from its header has no claims read):

- **C2PA content credentials** (the ``c2pa-python`` library, an optional extra): the active
  manifest's claim generator, the IPTC digital source type of its actions, and its
  validation state as the library reports it (``C2PA_STATES``).
- **XMP**: IPTC's ``Iptc4xmpExt:DigitalSourceType``, and ``xmp:CreatorTool`` as software.
- **PNG text chunks** that Stable Diffusion front ends write (``PNG_GENERATORS``).
- **EXIF** ``Software``.

Every byte of it is the uploader's: an XMP packet larger than ``MAX_XMP_BYTES`` is not
parsed; XML is parsed by ``defusedxml`` with no DTD at all (a billion-laughs or an external
entity is refused, never expanded or fetched); names are cut to ``MAX_TEXT`` characters; C2PA
validation never fetches (no OCSP, no remote manifest) and trusts only the certificates it
is given (``C2paTrust``). A part that cannot be read leaves its fields null and says why in
``Provenance.problem``; it never costs the image its score.
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass
from functools import lru_cache

from ntf_ray import storage
from ntf_ray.images.decode import DEFAULT_MAX_PIXELS
from ntf_ray.images.metadata import MAX_XMP_BYTES, read_metadata

#: IPTC's digital source types (https://cv.iptc.org/newscodes/digitalsourcetype/): a value is
#: kept as its last path segment when it is in this vocabulary's namespace.
IPTC_SOURCE_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
#: ``declared_source`` of an image whose only claim is a generator's own metadata.
GENERATOR_METADATA = "generator-metadata"
#: The sources, in the order one is preferred to the next for ``declared_source``.
C2PA, XMP, PNG_TEXT, EXIF = "c2pa", "xmp", "png-text", "exif"
#: ``c2pa_state``: the signature and the asset's hashes hold and the signer chains to a
#: certificate of a given trust list (trusted), or to none given (untrusted); the signature
#: or the manifest is broken (invalid); the manifest does not match these bytes: edited after
#: signing, or copied from another image (mismatched); there is a manifest the library could
#: not read (unreadable). Null: no manifest, or C2PA not read.
C2PA_STATES = ("trusted", "untrusted", "invalid", "mismatched", "unreadable")
#: PNG text keywords the common front ends write, and the front end each names.
PNG_GENERATORS = {
    "parameters": "AUTOMATIC1111 web UI (or a fork)",
    "prompt": "ComfyUI",
    "workflow": "ComfyUI",
    "invokeai_metadata": "InvokeAI",
    "sd-metadata": "InvokeAI",
    "Dream": "InvokeAI",
}
#: The score table's columns for these claims (``scan.table``), and the ``Provenance`` field each holds.
PROVENANCE_FIELDS = {"provenance": "provenance", "declared_source": "declared_source", "declared_by": "declared_by",
                     "c2pa_state": "c2pa_state", "provenance_problem": "problem"}
PROVENANCE_COLUMNS = tuple(PROVENANCE_FIELDS)
#: Declared sources that say "made by a generator", and those that say "a capture": where a
#: score that disagrees is worth a moderator's look first (``ntf-ray report``).
DECLARED_GENERATED = frozenset({"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia", "algorithmicMedia",
                                "compositeSynthetic", GENERATOR_METADATA})
DECLARED_CAPTURE = frozenset({"digitalCapture", "compositeCapture", "negativeFilm", "positiveFilm", "print"})
MAX_TEXT = 120
#: Seconds the C2PA library may spend reading one image: it reads through our stream, and a
#: read past this raises, so a manifest that keeps it reading ends as ``c2pa: too slow``.
C2PA_DEADLINE_S = 10.0

#: The formats C2PA credentials are read from (of those ``decode`` opens), as the library names them.
_MIMES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "TIFF": "image/tiff", "GIF": "image/gif"}
_PNG_KEYWORDS = frozenset({*PNG_GENERATORS, "Software"})
_XMP_TERM = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_HASH_MISMATCH = re.compile(r"assertion\.(data|bmff|boxes|collection)Hash\.mismatch")


@dataclass(frozen=True)
class Provenance:
    """One image's claims about itself (all null: it makes none, or none could be read)."""

    provenance: str | None = None  # which source said so (C2PA, XMP, PNG_TEXT, EXIF)
    declared_source: str | None = None  # IPTC digital source type, or GENERATOR_METADATA
    declared_by: str | None = None  # the claim generator or software named, cut to MAX_TEXT
    c2pa_state: str | None = None  # one of C2PA_STATES
    problem: str | None = None  # why parts could not be read ("xmp: DTDForbidden"; "; " between parts)

    def columns(self) -> dict[str, str | None]:
        """The score table's provenance columns of these claims (``PROVENANCE_FIELDS``)."""
        return {name: getattr(self, field) for name, field in PROVENANCE_FIELDS.items()}


#: The most read of one trust list (a PEM bundle of every public CA is about 250 KB).
TRUST_MAX_BYTES = 4 * 2**20


@dataclass(frozen=True)
class C2paTrust:
    """The certificates (PEM text) C2PA signers may chain to; none: every signer is untrusted."""

    anchors: str = ""

    @classmethod
    def from_files(cls, paths: list[str]) -> C2paTrust:
        """Trust lists from local PEM files (configuration: never fetched at run time), each
        parsed here: a file that holds no certificate, or a broken one, is refused, not
        silently a list that trusts no one."""
        if paths and not c2pa_available():
            raise ValueError("--c2pa-trust needs the C2PA library: pip install 'ntf-ray[c2pa]'")
        text = []
        for path in paths:
            from cryptography.x509 import load_pem_x509_certificates  # c2pa-python's own dependency

            if storage.local_path(path) is None:
                raise ValueError(f"--c2pa-trust {path}: a trust list is a local file (configuration, never fetched)")
            pem = storage.read_input(path, what="--c2pa-trust", max_bytes=TRUST_MAX_BYTES)
            try:
                load_pem_x509_certificates(pem)
            except ValueError as exc:
                raise ValueError(f"--c2pa-trust {path}: not PEM certificates ({exc})") from None
            text.append(pem.decode("ascii"))
        return cls("\n".join(text))


def c2pa_available() -> bool:
    """Whether the C2PA library is installed (without it, C2PA fields stay null)."""
    try:
        import c2pa  # noqa: F401
    except ImportError:
        return False
    return True


def read_provenance(data: bytes | memoryview, trust: C2paTrust | None = None, *,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Provenance:
    """The claims ``data`` makes about its origin (see module); never raises for bad bytes.
    ``max_pixels``: the limit the image is decoded under (``decode``'s): an image over it, or
    in a format ``decode`` does not open, has no claims read (``problem`` says which)."""
    meta = read_metadata(data, max_pixels=max_pixels, keywords=_PNG_KEYWORDS)
    if not meta.readable:
        return Provenance(problem="; ".join(meta.problems) or None)
    problems: list[str] = []
    claims: dict[str, tuple[str | None, str | None]] = {}  # source -> (declared source, declared by)
    state = broken = None
    mime = _MIMES.get(meta.format)
    if mime is not None and not meta.damaged:  # a container cut short or broken: the library would only fail on it
        state, claim, problem = _c2pa(data, mime, trust or C2paTrust())
        if claim is not None and state in ("trusted", "untrusted"):  # a broken credential's claim is no claim:
            claims[C2PA] = claim  # the image's other claims speak, and c2pa_state says what the credential is
        elif claim is not None and state is not None:
            broken = claim
        if problem:
            problems.append(problem)
    problems.extend(meta.problems)

    if meta.xmp:
        try:
            claims[XMP] = _xmp(meta.xmp)
        except Exception as exc:  # noqa: BLE001 - hostile or broken XML: refused, reason kept
            problems.append(_problem("xmp", exc))

    if meta.format == "PNG":
        text = meta.text
        front_ends = [PNG_GENERATORS[k] for k in PNG_GENERATORS if text.get(k, "").strip()]
        named = text.get("Software")
        if front_ends:
            claims[PNG_TEXT] = (GENERATOR_METADATA, _cut(named or front_ends[0]))
        elif named and named.strip():
            claims[PNG_TEXT] = (None, _cut(named))
    if meta.software:
        claims[EXIF] = (None, _cut(meta.software))

    if state in ("invalid", "mismatched") and not any(c[0] for c in claims.values()):
        claims[C2PA] = broken  # nothing else declares a source: what the broken credential says, beside its state
    order = (C2PA, XMP, PNG_TEXT, EXIF)
    source = next((s for s in order if s in claims and claims[s][0]), None)
    named = next((s for s in order if s in claims and claims[s][1]), None)
    declared_by = claims[source][1] if source and claims[source][1] else claims[named][1] if named else None
    return Provenance(provenance=source or named, declared_source=claims[source][0] if source else None,
                      declared_by=declared_by, c2pa_state=state, problem="; ".join(problems) or None)


def provenance_of(data, trust: C2paTrust | None = None, *,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Provenance:
    """``read_provenance``, and a reason instead of an exception should it ever raise: an
    object's claims never cost its score."""
    try:
        return read_provenance(data, trust, max_pixels=max_pixels)
    except Exception as exc:  # noqa: BLE001 - a bug here must not cost the row
        return Provenance(problem=_problem("provenance", exc))


def _xmp(packet: bytes) -> tuple[str | None, str | None]:
    """(IPTC digital source type, creator tool) of an XMP packet; raises on hostile or broken XML."""
    from defusedxml import ElementTree

    if len(packet) > MAX_XMP_BYTES:
        raise _TooLarge
    root = ElementTree.fromstring(packet.strip(b"\x00 \t\r\n"), forbid_dtd=True)
    source = tool = None
    for element in root.iter():
        for name, value in [(element.tag, element.text), *element.attrib.items()]:
            local = name.rsplit("}", 1)[-1] if isinstance(name, str) else ""
            if local == "DigitalSourceType" and source is None and value and value.strip():
                source = _source_type(value.strip())
            elif local == "CreatorTool" and tool is None and value and value.strip():
                tool = _cut(value.strip())
    return source, tool


def _source_type(value: str) -> str:
    """An IPTC digital source type as its term; anything else as ``other``."""
    term = value[len(IPTC_SOURCE_TYPES):] if value.startswith(IPTC_SOURCE_TYPES) else value
    return term if _XMP_TERM.fullmatch(term) else "other"


def _c2pa(data: bytes, mime: str, trust: C2paTrust) -> tuple[str | None, tuple | None, str | None]:
    """(state, (declared source, declared by), problem) of the C2PA manifest in ``data``."""
    try:
        import c2pa
    except ImportError:  # said on the row: the driver's environment may have it where the workers' has not
        return None, None, "c2pa: not installed"
    stream = _Deadline(data, time.monotonic() + C2PA_DEADLINE_S)
    try:
        with c2pa.Reader(mime, stream, context=_context(trust.anchors)) as reader:
            store = json.loads(reader.json())
            state = reader.get_validation_state()
        manifest = (store.get("manifests") or {}).get(store.get("active_manifest")) or {}
        failures = [f.get("code", "") for f in ((store.get("validation_results") or {}).get("activeManifest") or {})
                    .get("failure", [])]
        claim = (_c2pa_source(manifest), _c2pa_generator(manifest))
    except Exception as exc:  # noqa: BLE001 - the library's errors for what it could not read
        if stream.late:
            return "unreadable", None, "c2pa: too slow"
        if type(exc).__name__.endswith("ManifestNotFound"):
            return None, None, None
        return "unreadable", None, _problem("c2pa", exc)
    if state == "Trusted":
        verdict = "trusted"
    elif state == "Valid":
        verdict = "untrusted"
    elif any(_HASH_MISMATCH.fullmatch(code) for code in failures):
        verdict = "mismatched"
    else:
        verdict = "invalid"
    return verdict, claim, None


def _c2pa_source(manifest: dict) -> str | None:
    """The digital source type the manifest's actions name last: what the image is now (a
    capture then edited with generative fill is ``compositeWithTrainedAlgorithmicMedia``)."""
    named = [a["digitalSourceType"] for assertion in manifest.get("assertions") or []
             if isinstance(assertion, dict) and str(assertion.get("label", "")).startswith("c2pa.actions")
             for a in ((assertion.get("data") or {}).get("actions") or [])
             if isinstance(a, dict) and isinstance(a.get("digitalSourceType"), str)]
    return _source_type(named[-1]) if named else None


def _c2pa_generator(manifest: dict) -> str | None:
    info = manifest.get("claim_generator_info")
    if isinstance(info, list) and info and isinstance(info[0], dict) and isinstance(info[0].get("name"), str):
        name, version = info[0]["name"], info[0].get("version")
        return _cut(f"{name} {version}" if isinstance(version, str) and version else name)
    generator = manifest.get("claim_generator")
    return _cut(generator) if isinstance(generator, str) and generator else None


@lru_cache(maxsize=4)
def _context(anchors: str):
    """The library's settings: trust only ``anchors``, and fetch nothing while validating: no
    OCSP, no remote manifest, and no host it may reach at all (the library takes unknown
    keys silently, so the last is the guard a misspelt one cannot undo; a test listens)."""
    import c2pa

    settings = {"verify": {"ocsp_fetch": False, "remote_manifest_fetch": False},
                "core": {"allowed_network_hosts": []}}
    if anchors:
        settings["trust"] = {"trust_anchors": anchors}
    return c2pa.Context(c2pa.Settings.from_dict(settings))


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "\u2026"


class _Deadline(io.BytesIO):
    """The bytes as the C2PA library reads them: a read past ``deadline`` raises (and says so)."""

    def __init__(self, data, deadline: float):
        super().__init__(data)
        self.deadline, self.late = deadline, False

    def _check(self) -> None:
        if time.monotonic() > self.deadline:
            self.late = True
            raise TimeoutError("C2PA read past its deadline")

    def read(self, size: int | None = -1) -> bytes:
        self._check()
        return super().read(size)

    def readinto(self, buffer) -> int:  # what the library calls
        self._check()
        return super().readinto(buffer)


class _TooLarge(ValueError):
    """A part over its size cap, refused before it is parsed."""


def _problem(part: str, exc: BaseException) -> str:
    """The reason a part was not read, from a small set that a summary can count: the part and
    the error's kind (``xmp: DTDForbidden``), never the message, which may quote the upload."""
    kind = "too large" if isinstance(exc, _TooLarge) else type(exc).__name__.lstrip("_")
    if kind == "C2paError":  # the library's catch-all: its message's first word is the kind ("Remote: ...")
        head = str(exc).split(":", 1)[0]
        kind = f"C2paError.{head}" if head.isidentifier() and len(head) <= 32 else kind
    return f"{part}: {kind}"
