"""Images that say where they came from, built with the libraries that write such claims.

C2PA manifests are signed by the ``c2pa-python`` library itself with an ES256 certificate
made here (a test root and a signer under it); PNG text chunks in the shapes the common
front ends write; XMP with and without IPTC's ``DigitalSourceType``; and the hostile XMP of
``HOSTILE_XMP``. ``make_provenance_images(folder)`` writes one file of each kind (AI-generated,
camera capture, edited, tampered after signing, manifest transplanted, claim forged, front-end
text chunks, XMP, EXIF, none) and returns what each must read as. ``pixels_decoded()`` records
every way Pillow would decode pixels while claims are read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageFile, PngImagePlugin

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"

A1111_PARAMETERS = ("a red fox in the snow, highly detailed\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, "
                    "CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 31e35c80fc, Model: sd_xl_base_1.0")
COMFY_PROMPT = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20}},
                           "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}}})
COMFY_WORKFLOW = json.dumps({"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}]})


def xmp_packet(source_type: str | None = None, tool: str | None = None, as_element: bool = False) -> bytes:
    """An XMP packet as Adobe and IPTC write it: the source type as an attribute or an element."""
    attrs, body = [], []
    if tool:
        attrs.append(f'xmp:CreatorTool="{tool}"')
    if source_type and as_element:
        body.append(f"<Iptc4xmpExt:DigitalSourceType>{source_type}</Iptc4xmpExt:DigitalSourceType>")
    elif source_type:
        attrs.append(f'Iptc4xmpExt:DigitalSourceType="{source_type}"')
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
            'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" ' + " ".join(attrs) + ">"
            + "".join(body) + "</rdf:Description></rdf:RDF></x:xmpmeta>\n"
            '<?xpacket end="w"?>').encode()


#: XMP an attacker writes: a billion laughs (entities of entities), an external entity that
#: names a local file, an external DTD, and a packet of 8 MiB.
HOSTILE_XMP = {
    "billion-laughs": (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "lol">'
                       + b"".join(b'<!ENTITY %s "%s">' % (bytes([98 + i]), (b"&" + bytes([97 + i]) + b";") * 10)
                                  for i in range(9))
                       + b']><x:xmpmeta xmlns:x="adobe:ns:meta/">&j;</x:xmpmeta>'),
    "external-entity": (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                        b'<x:xmpmeta xmlns:x="adobe:ns:meta/">&e;</x:xmpmeta>'),
    "external-dtd": (b'<?xml version="1.0"?><!DOCTYPE x SYSTEM "http://127.0.0.1:9/evil.dtd">'
                     b'<x:xmpmeta xmlns:x="adobe:ns:meta/"/>'),
    "oversized": xmp_packet(IPTC + "digitalCapture", tool="x" * (8 << 20)),
}


def _pixels(seed: int) -> Image.Image:
    return Image.new("RGB", (64, 48), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))


def png_bytes(seed: int = 0, text: dict[str, str] | None = None, xmp: bytes | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    if xmp is not None:
        info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"))
    out = io.BytesIO()
    _pixels(seed).save(out, "PNG", pnginfo=info)
    return out.getvalue()


def jpeg_bytes(seed: int = 0, software: str | None = None, xmp: bytes | None = None) -> bytes:
    exif = Image.Exif()
    if software:
        exif[0x0131] = software
    out = io.BytesIO()
    _pixels(seed).save(out, "JPEG", quality=90, exif=exif, **({"xmp": xmp} if xmp is not None else {}))
    return out.getvalue()


def with_xmp_segment(jpeg: bytes, packet: bytes) -> bytes:
    """``jpeg`` with an APP1 XMP segment put right after its start-of-image marker."""
    body = b"http://ns.adobe.com/xap/1.0/\x00" + packet
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(body)) + body + jpeg[2:]


def with_declared_size(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its frame header declaring ``width x height`` (the pixels are not there)."""
    at = 2 + sum(len(seg) for marker, seg in _until_frame(jpeg))
    return jpeg[:at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]


def _until_frame(jpeg: bytes) -> list[tuple[int, bytes]]:
    segments = []
    for marker, seg in jpeg_segments(jpeg):
        if marker in (0xC0, 0xC1, 0xC2):
            break
        segments.append((marker, seg))
    return segments


@contextlib.contextmanager
def pixels_decoded() -> Iterator[list[tuple[str, str | None]]]:
    """Records, while inside, every call by which Pillow turns a file into pixels: any plugin's
    ``load()`` and every decoder it makes (PNG's, WebP's, ...). Not thread-safe: tests only."""
    calls: list[tuple[str, str | None]] = []
    load, getdecoder = ImageFile.ImageFile.load, Image._getdecoder

    def recorded_load(self, *args, **kwargs):
        calls.append(("load", self.format))
        return load(self, *args, **kwargs)

    def recorded_decoder(mode, decoder_name, *args, **kwargs):
        calls.append(("decoder", decoder_name))
        return getdecoder(mode, decoder_name, *args, **kwargs)

    ImageFile.ImageFile.load, Image._getdecoder = recorded_load, recorded_decoder
    try:
        yield calls
    finally:
        ImageFile.ImageFile.load, Image._getdecoder = load, getdecoder


class CredentialSigner:
    """An ES256 signer under a test root made here; ``root_pem`` is what a trust list would hold."""

    def __init__(self, name: str = "ntf-ray test signer"):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        def subject(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                              x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ntf-ray tests")])

        def usage(sign: bool) -> x509.KeyUsage:
            return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                                 data_encipherment=False, key_agreement=False, key_cert_sign=not sign,
                                 crl_sign=not sign, encipher_only=False, decipher_only=False)

        now = dt.datetime.now(dt.timezone.utc)
        root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        root = (x509.CertificateBuilder().subject_name(subject("ntf-ray test root")).issuer_name(subject("ntf-ray test root"))
                .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(usage(False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
                .sign(root_key, hashes.SHA256()))
        leaf = (x509.CertificateBuilder().subject_name(subject(name)).issuer_name(root.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(usage(True), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                               critical=False)
                .sign(root_key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        self.root_pem = root.public_bytes(pem).decode()
        self.chain = leaf.public_bytes(pem) + root.public_bytes(pem)
        self.key = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def sign(self, data: bytes, mime: str, generator: str, actions: list[dict]) -> bytes:
        """``data`` with a C2PA manifest of ``actions``, claimed by ``generator``."""
        import c2pa

        manifest = {"claim_generator_info": [{"name": generator, "version": "1.0"}],
                    "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}}]}
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg=b"es256", sign_cert=self.chain, private_key=self.key,
                                                           ta_url=None))
        out = io.BytesIO()
        with c2pa.Builder(json.dumps(manifest)) as builder:
            builder.sign(signer, mime, io.BytesIO(data), out)
        return out.getvalue()


def created(source_type: str) -> dict:
    return {"action": "c2pa.created", "digitalSourceType": IPTC + source_type}


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """A JPEG's marker segments before its scan: (marker, the segment's bytes)."""
    out, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] != 0xDA:
        n = int.from_bytes(data[i + 2:i + 4], "big")
        out.append((data[i + 1], data[i:i + 2 + n]))
        i += 2 + n
    return out


def transplant(signed: bytes, other: bytes) -> bytes:
    """``other`` (a JPEG) carrying ``signed``'s C2PA manifest (its APP11 segments) as its own."""
    app11 = b"".join(seg for marker, seg in jpeg_segments(signed) if marker == 0xEB)
    return other[:2] + app11 + other[2:]


def tampered(signed: bytes) -> bytes:
    """``signed`` (a JPEG) with its pixels changed after signing, still a sound JPEG: one entry
    of its first quantisation table moved by one."""
    at = 2
    for marker, segment in jpeg_segments(signed):
        if marker == 0xDB:
            break
        at += len(segment)
    at += 5  # the marker, the length (2), precision and table id (1): the first entry
    edited = bytearray(signed)
    edited[at] += 1 if edited[at] < 255 else -1
    return bytes(edited)


def forged_claim(signed: bytes, was: bytes, now: bytes) -> bytes:
    """``signed`` with text of its C2PA claim replaced (same length): its signature no longer verifies."""
    assert len(was) == len(now) and signed.count(was) == 1
    return signed.replace(was, now)


def make_provenance_images(folder: Path, signer: CredentialSigner | None = None) -> dict[str, dict]:
    """One file of each kind under ``folder``; returns name -> the fields it must read as
    (``c2pa_state`` as read without a trust list)."""
    folder.mkdir(parents=True, exist_ok=True)
    signer = signer or CredentialSigner()
    ai = signer.sign(jpeg_bytes(1), "image/jpeg", "Example Image Model", [created("trainedAlgorithmicMedia")])
    files = {
        "c2pa-ai.jpg": (ai, dict(provenance="c2pa", declared_source="trainedAlgorithmicMedia",
                                 declared_by="Example Image Model 1.0", c2pa_state="untrusted")),
        "c2pa-capture.png": (signer.sign(png_bytes(2), "image/png", "Example Camera", [created("digitalCapture")]),
                             dict(provenance="c2pa", declared_source="digitalCapture",
                                  declared_by="Example Camera 1.0", c2pa_state="untrusted")),
        "c2pa-edited.jpg": (signer.sign(jpeg_bytes(3), "image/jpeg", "Example Editor", [
            created("digitalCapture"),  # a capture, then generative fill: what it is now is the last word
            {"action": "c2pa.edited", "digitalSourceType": IPTC + "compositeWithTrainedAlgorithmicMedia"}]),
            dict(provenance="c2pa", declared_source="compositeWithTrainedAlgorithmicMedia",
                 declared_by="Example Editor 1.0", c2pa_state="untrusted")),
        "c2pa-tampered.jpg": (tampered(ai), dict(provenance="c2pa", declared_source="trainedAlgorithmicMedia",
                                                 c2pa_state="mismatched")),
        "c2pa-transplanted.jpg": (transplant(signer.sign(jpeg_bytes(4), "image/jpeg", "Example Camera",
                                                         [created("digitalCapture")]), jpeg_bytes(5)),
                                  dict(provenance="c2pa", declared_source="digitalCapture", c2pa_state="mismatched")),
        "c2pa-forged-claim.jpg": (forged_claim(signer.sign(jpeg_bytes(13), "image/jpeg", "Example Forger",
                                                           [created("digitalCapture")]), b"Forger", b"Camera"),
                                  dict(provenance="c2pa", declared_source="digitalCapture",
                                       declared_by="Example Camera 1.0", c2pa_state="invalid")),
        "a1111.png": (png_bytes(6, {"parameters": A1111_PARAMETERS}),
                      dict(provenance="png-text", declared_source="generator-metadata",
                           declared_by="AUTOMATIC1111 web UI (or a fork)", c2pa_state=None)),
        "comfyui.png": (png_bytes(7, {"prompt": COMFY_PROMPT, "workflow": COMFY_WORKFLOW}),
                        dict(provenance="png-text", declared_source="generator-metadata", declared_by="ComfyUI")),
        "xmp-ai.jpg": (jpeg_bytes(8, xmp=xmp_packet(IPTC + "trainedAlgorithmicMedia", tool="Example Generator 2")),
                       dict(provenance="xmp", declared_source="trainedAlgorithmicMedia",
                            declared_by="Example Generator 2")),
        "xmp-capture-element.png": (png_bytes(9, xmp=xmp_packet(IPTC + "digitalCapture", as_element=True)),
                                    dict(provenance="xmp", declared_source="digitalCapture", declared_by=None)),
        "xmp-no-iptc.jpg": (jpeg_bytes(10, xmp=xmp_packet(tool="Example Photo Editor 5.1")),
                            dict(provenance="xmp", declared_source=None, declared_by="Example Photo Editor 5.1")),
        "exif-software.jpg": (jpeg_bytes(11, software="Example Phone Camera 3.2"),
                              dict(provenance="exif", declared_source=None, declared_by="Example Phone Camera 3.2")),
        "plain.png": (png_bytes(12), dict(provenance=None, declared_source=None, declared_by=None, c2pa_state=None)),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: want for name, (_, want) in files.items()}
