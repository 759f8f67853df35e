"""Verify any file a user brings: separate, explicit evidence and one conclusion that never overreaches.

For each file ``verify`` reports, side by side:

- **manifest**: the embedded C2PA manifest checked now with this call's trust settings (state, per-manifest
  deduplicated failure codes, which list vouched for the signer; a remote manifest is named, not fetched);
- **watermark**: what the detector decoded (payload, corrected bits, CRC result, the detector's own
  false-positive bound), passed through as ``provenance.watermark`` returns it;
- **fingerprint**: the stored stamps and stamp sources (ingredients) whose stable pHash bits agree, each
  with its pixel ratio and whether it qualifies as the same picture, and whether more than one qualifies;
- **record**: the stored stamp the conclusion names, its status *as recorded at stamp time* and, where
  the store kept the manifest, re-checked now against this call's trust settings;
- **conclusion**: one of ``diffaudit.verdicts.CONCLUSIONS``, with the reason in a sentence.

A watermark payload only names a candidate; "same image" needs the pixels to agree too; degenerate
(flat, low-texture) images never match; two candidates that qualify about equally give ``ambiguous``; a
file whose own manifest is Invalid is ``tampered``.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit import imaging
from diffaudit import verdicts as V
from diffaudit.errors import InputError
from diffaudit.runs import sha256_bytes
from provenance import c2pa as cc
from provenance import fingerprint as F
from provenance.store import ManifestStore, StoredIngredient, StoredStamp, default_store_path
from provenance.watermark import UNSTORED_METHODS

#: Formats whose pixels are decoded (through ``diffaudit.imaging``) for the watermark and fingerprint.
PIXEL_TYPES = {"image/png", "image/jpeg", "image/webp", "image/tiff", "image/gif", "image/avif", "image/bmp"}
FAIL_ON = ("invalid", "untrusted", "none")


@dataclass
class VerifyResult:
    """The verdict on one file: evidence kept apart, and one conclusion."""

    path: str
    status: str                                   # the embedded manifest: Trusted | Valid | Invalid | none
    format: str | None = None                     # MIME type
    conclusion: str = V.NONE
    reason: str = ""
    credentials: dict[str, Any] = field(default_factory=dict)
    watermark: dict[str, Any] | None = None
    fingerprint: dict[str, Any] | None = None
    record: dict[str, Any] | None = None
    store: str | None = None
    problem: str | None = None

    @property
    def failure_codes(self) -> list[str]:
        return list(self.credentials.get("failure_codes", []))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fails(self, conditions: Iterable[str]) -> bool:
        """Whether the embedded manifest meets a ``--fail-on`` condition (invalid, untrusted, none)."""
        state = {"Invalid": "invalid", "Valid": "untrusted", "none": "none"}.get(self.status)
        return state in set(conditions)


# --- inputs ------------------------------------------------------------------------------------

def readable_suffixes() -> set[str]:
    """File extensions c2pa-python reads (``Reader.get_supported_mime_types`` lists them too)."""
    import c2pa

    exts = {f".{m.lower()}" for m in c2pa.Reader.get_supported_mime_types() if "/" not in m}
    for mime in cc.supported_mime_types():
        exts.update(mimetypes.guess_all_extensions(mime))
    return exts | {".png", ".jpg", ".jpeg", ".webp"}


def expand(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """Files to verify and files skipped: files as given (whatever their extension), and under folders the
    files whose extension c2pa-python reads, sorted; the other files in those folders are skipped (and
    counted). A missing path is an ``InputError``."""
    files, skipped = [], []
    suffixes = readable_suffixes()
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file())
            keep = [f for f in found if f.suffix.lower() in suffixes]
            if not keep:
                raise InputError(f"{p}: no files of a type C2PA reads in this folder (see `diffaudit verify --help`)")
            files += keep
            skipped += [f for f in found if f.suffix.lower() not in suffixes]
        elif p.exists():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return files, skipped


def decode_pixels(data: bytes, name: str) -> tuple[np.ndarray | None, str | None]:
    """RGB pixels through the one decode policy, or why not. A PNG refused for a bad CRC in an ancillary
    chunk (a broken manifest chunk, say) is decoded without those chunks, and says so."""
    try:
        return np.asarray(imaging.open_image(data, name=name, mode="RGB")), None
    except imaging.ImageTooLarge as e:
        return None, str(e)
    except InputError as e:
        repaired, dropped = cc.without_bad_png_chunks(data)
        if dropped:
            try:
                rgb = np.asarray(imaging.open_image(repaired, name=name, mode="RGB"))
                return rgb, f"bad CRC in PNG chunk(s) {', '.join(dropped)}: pixels read without them"
            except InputError:
                pass
        return None, str(e)


# --- evidence ----------------------------------------------------------------------------------

def _watermark(rgb: np.ndarray, methods: list[str], store: ManifestStore | None) -> tuple[dict[str, Any], Any]:
    """The first detection among ``methods`` by each method's robust decoder (as is, mirrored, rescaled to
    the sizes the store's stamps had, or to common generation sizes without a store), as the detector
    reports it; ``false_positive_bound_all`` is the union bound over every method tried."""
    from provenance.watermark import available, get

    usable = set(available())
    tried, last, bound = [], None, 0.0
    skipped = [m for m in methods if m not in usable]  # e.g. trustMark stamps in the store, no weights here
    for method in (m for m in methods if m in usable):
        sizes = store.sizes(method) if store is not None else []
        det = get(method).detect_robust(rgb, sizes=sizes or None)
        tried.append(method)
        bound += float(det.false_positive_bound or 0.0)
        last = det
        if det.detected:
            break
    if last is None:
        return {"detected": False, "tried": tried, "not_tried": skipped}, None
    d = {k: v for k, v in asdict(last).items() if k != "bits" and not isinstance(v, np.ndarray)}
    d = {k: (v.item() if hasattr(v, "item") else v) for k, v in d.items()}
    d["corrected_bits"] = d.pop("corrected", 0)
    d["crc_ok"] = d.pop("check_ok", False)
    d["tried"] = tried
    if skipped:
        d["not_tried"] = skipped  # said, never silently dropped: a mark of these methods cannot be read here
    d["false_positive_bound_all"] = min(1.0, bound)
    return d, last if last.detected else None


#: A watermark alone (pixels not agreeing) names a stamp only when the chance that a clean image decodes
#: to a payload the store holds is below this: bound x stored payloads / 2^id_bits.
MAX_FALSE_MATCH = 1e-6


@dataclass
class _Cand:
    rec: StoredStamp | StoredIngredient
    disagreement: int | None
    ratio: float | None

    @property
    def is_source(self) -> bool:
        return isinstance(self.rec, StoredIngredient)

    @property
    def label(self) -> str:
        return self.rec.manifest_label

    def qualifies(self) -> bool:
        return self.ratio is not None and self.ratio <= F.SAME_IMAGE_RATIO


def _ratio(query: F.Fingerprint | None, rec: StoredStamp | StoredIngredient) -> float | None:
    """The pixel ratio, when both sides can be checked (neither degenerate, the record has a thumbnail)."""
    if query is None or query.degenerate or rec.fingerprint is None or rec.fingerprint.degenerate:
        return None
    return round(F.pixel_ratio(query, rec.fingerprint), 4)


def _describe(c: _Cand, store: ManifestStore) -> dict[str, Any]:
    stamp = c.rec if isinstance(c.rec, StoredStamp) else store.get(c.rec.manifest_label)
    d = {"manifest_label": c.label, "role": "source (ingredient)" if c.is_source else "stamped output",
         "image_id": stamp.image_id if stamp else None, "run": stamp.run if stamp else None,
         "stable_bit_disagreement": c.disagreement, "pixel_ratio": c.ratio, "qualifies": c.qualifies()}
    if c.is_source:
        d["title"] = c.rec.title
        d["relationship"] = c.rec.relationship
    if c.ratio is None:
        d["why_unchecked"] = "no thumbnail in the store, or low texture" if c.rec.fingerprint is None or \
            c.rec.fingerprint.degenerate else "the file is low texture"
    return d


def _record(stamp: StoredStamp, store: ManifestStore, context, trust, role: str, how: str) -> dict[str, Any]:
    """The named stamp: identity, credentials as recorded at stamp time, and re-checked now."""
    creds = stamp.credentials or {}
    recorded = cc.Credentials(creds.get("status", "none"), trust=creds.get("trust")).status_words
    return {**stamp.summary(), "role": role, "found_by": how,
            "recorded_at_stamp_time": {"status": recorded, "words": f"{recorded}, as recorded at stamp time"},
            "checked_now": cc.recheck_manifest(stamp.manifest, context, trust),
            "credentials": {k: creds.get(k) for k in ("manifest_label", "signer", "claim_generator", "generation",
                                                      "ingredients", "actions")},
            "store": str(store.path)}


def verify_bytes(data: bytes, *, name: str = "<bytes>", context=None, store: ManifestStore | None = None,
                 methods: Iterable[str] | None = None, trust: cc.TrustSettings | None = None) -> VerifyResult:
    """Verify one file's bytes; never raises on bad input (the problem is reported instead)."""
    creds = cc.read_credentials(data, context, name=name, trust=trust)
    result = VerifyResult(name, creds.status, creds.format, credentials=creds.to_dict(), problem=creds.problem,
                          store=str(store.path) if store is not None else None)
    if creds.status in ("Trusted", "Valid"):
        signer = (creds.signer or {}).get("common_name")
        result.conclusion, result.reason = V.INTACT, (f"embedded manifest {creds.status_words}"
                                                      + (f", signed by {signer}" if signer else ""))
        return result
    notes = [creds.problem] if creds.problem else []
    rgb = None
    if creds.format in PIXEL_TYPES:
        rgb, why = decode_pixels(data, name)
        if why:
            notes.append(why)
    elif creds.format:
        notes.append(f"no pixels checked ({creds.format}): watermark and fingerprint need an image")
    det = None
    if rgb is not None:
        methods = list(methods) if methods is not None else (store.methods() if store is not None else []) or \
            list(UNSTORED_METHODS)
        result.watermark, det = _watermark(rgb, methods, store)
    query = F.fingerprint(rgb) if rgb is not None else None
    if query is not None:
        result.fingerprint = {"phash": f"{query.phash:016x}", "stable_bits": query.stable_bits,
                              "gradient": round(query.gradient, 2), "degenerate": query.degenerate,
                              "same_image_ratio": F.SAME_IMAGE_RATIO, "candidates": [], "more_than_one": False}
    tampered = creds.status == "Invalid"
    if store is None:
        result.conclusion = V.TAMPERED if tampered else V.NONE
        result.reason = ("the embedded manifest does not validate: " + ", ".join(creds.failure_codes)) if tampered \
            else "no valid manifest, and no manifest store to look in"
        result.problem = "; ".join(n for n in notes if n) or None
        return result

    # -- the store's evidence -------------------------------------------------------------------
    wm_cands = [_Cand(r, None, _ratio(query, r)) for r in
                (store.stamps_with_payload(det.method, det.payload) if det is not None else [])]
    fp_cands: list[_Cand] = []
    if query is not None and not query.degenerate:
        fp_cands = [_Cand(r, d, _ratio(query, r)) for r, d in store.candidates(query)]
    digest = sha256_bytes(data)
    exact = store.stamps_by_sha256(digest)
    exact_src = store.ingredients_by_sha256(digest)
    seen = {(c.label, c.is_source, getattr(c.rec, "position", None)) for c in fp_cands}
    listed = fp_cands + [c for c in wm_cands if (c.label, False, None) not in seen]
    listed.sort(key=lambda c: (c.ratio is None, c.ratio if c.ratio is not None else 0.0))
    qualifying, same_source = [], {}
    for c in fp_cands:
        if c.qualifies():  # one source photo given to several stamps is one picture, not an ambiguity
            key = c.rec.sha256 if c.is_source else None
            if key is not None and key in same_source:
                same_source[key].append(c.label)
                continue
            if key is not None:
                same_source[key] = []
            qualifying.append(c)
    if result.fingerprint is not None:
        result.fingerprint["candidates"] = [_describe(c, store) for c in listed]
        result.fingerprint["more_than_one"] = len(qualifying) > 1

    def stamp_of(c: _Cand) -> StoredStamp | None:
        return c.rec if isinstance(c.rec, StoredStamp) else store.get(c.label)

    def decisive(cs: list[_Cand]) -> _Cand | None:
        cs = sorted(cs, key=lambda c: c.ratio)
        if len(cs) > 1 and cs[0].ratio > F.DECISIVE * cs[1].ratio:
            return None
        return cs[0] if cs else None

    conclusion, reason, named, role, how = V.NONE, "", None, "", ""
    wm_words = (f"watermark {det.method} payload {det.payload} (CRC ok, {det.corrected} bit(s) corrected)"
                if det is not None else "")
    if tampered:
        conclusion = V.TAMPERED
        reason = "the embedded manifest does not validate: " + ", ".join(creds.failure_codes)
        origin = (decisive([c for c in wm_cands if c.qualifies()]) or (wm_cands[0] if len(wm_cands) == 1 else None)
                  or decisive(qualifying))
        if origin is not None:
            named, role, how = stamp_of(origin), "derived from", "watermark" if origin in wm_cands else "fingerprint"
            reason += f"; it was derived from stored stamp {origin.label}"
    elif wm_cands and not [c for c in wm_cands if c.qualifies()] and _false_match(det, store) > MAX_FALSE_MATCH:
        reason = (f"{wm_words} matches stored stamp(s), but this method's check is too short to name a stamp on "
                  f"the watermark alone (chance of a false match {_false_match(det, store):.1e}) and the pixels differ")
    elif wm_cands:
        good = [c for c in wm_cands if c.qualifies()]
        pick = decisive(good) if good else (wm_cands[0] if len(wm_cands) == 1 else None)
        if pick is None:
            conclusion = V.AMBIGUOUS
            reason = f"{wm_words} is carried by {len(wm_cands)} stored stamps and the pixels settle none"
        elif pick.qualifies():
            conclusion, named, role, how = V.SAME, stamp_of(pick), "same image", "watermark + pixels"
            reason = f"{wm_words} names {pick.label}, and the pixels agree (ratio {pick.ratio} <= {F.SAME_IMAGE_RATIO})"
        else:
            conclusion, named, role, how = V.EDITED, stamp_of(pick), "derived from", "watermark"
            why = (f"the pixels differ (ratio {pick.ratio} > {F.SAME_IMAGE_RATIO})" if pick.ratio is not None
                   else "the pixels cannot be compared (" + ("the store kept no thumbnail" if pick.rec.fingerprint
                                                             is None else "low texture") + ")")
            reason = f"{wm_words} names {pick.label}, but {why}"
    elif exact:
        conclusion, named, role, how = V.SAME, exact[0], "same image", "identical bytes"
        reason = f"the file's bytes are those stamped as {exact[0].manifest_label}"
    elif exact_src:
        conclusion, named, role, how = V.SOURCE, store.get(exact_src[0].manifest_label), "source of", "identical bytes"
        reason = f"the file's bytes are the source image of stamp {exact_src[0].manifest_label}"
        others = sorted({i.manifest_label for i in exact_src} - {exact_src[0].manifest_label})
        if others:
            reason += f" (and of {len(others)} other stamp(s): {', '.join(others)})"
    elif qualifying:
        pick = decisive(qualifying)
        if pick is None:
            conclusion = V.AMBIGUOUS
            reason = (f"{len(qualifying)} stored images match about equally (pixel ratios "
                      + ", ".join(str(c.ratio) for c in sorted(qualifying, key=lambda c: c.ratio)) + "): none is named")
        elif pick.is_source:
            conclusion, named, role, how = V.SOURCE, stamp_of(pick), "source of", "fingerprint + pixels"
            reason = (f"the file matches the source image {pick.rec.title!r} of stamp {pick.label} (ratio {pick.ratio}) "
                      "better than any stamped output: it is what the model started from")
            if same_source.get(pick.rec.sha256):
                reason += f" (also the source of {', '.join(same_source[pick.rec.sha256])})"
        else:
            conclusion, named, role, how = V.SAME, stamp_of(pick), "same image", "fingerprint + pixels"
            reason = (f"fingerprint ({pick.disagreement} stable bit(s) differ) and pixels (ratio {pick.ratio} <= "
                      f"{F.SAME_IMAGE_RATIO}) agree with {pick.label}; no watermark was read")
    else:
        why = []
        if det is not None:
            why.append(f"{wm_words}, but no stamp in this store carries it")
        if query is not None and query.degenerate:
            why.append(query.degenerate)
        elif listed:
            why.append(f"{len(listed)} stored image(s) share the fingerprint but their pixels differ")
        elif query is not None:
            why.append("no stored image shares the fingerprint")
        if query is None:
            why.append("no pixels to compare")
        reason = "; ".join(why) or "nothing to compare"
    result.conclusion, result.reason = conclusion, reason
    if named is not None:
        result.record = _record(named, store, context, trust, role, how)
    result.problem = "; ".join(n for n in notes if n) or None
    return result


def _false_match(det, store: ManifestStore) -> float:
    from provenance.watermark import get

    n = store.count_payloads(det.method)
    return float(det.false_positive_bound or 0.0) * n / 2.0 ** get(det.method).id_bits


def load_settings(trust_anchors: str | os.PathLike | None = None, allowed_list: str | os.PathLike | None = None,
                  trust_config: str | os.PathLike | None = None) -> cc.TrustSettings:
    """This verification's trust: anchors (PEM bundle or folder), an allowed list, a c2pa-rs trust config."""
    t = cc.TrustSettings()
    if trust_anchors:
        t = t.extend(cc.load_trust(trust_anchors))
    if allowed_list:
        t = t.extend(cc.load_allowed_list(allowed_list))
    if trust_config:
        t = t.extend(cc.load_trust_config(trust_config))
    return t


def open_store(store: ManifestStore | str | os.PathLike | None, default: bool = True) -> ManifestStore | None:
    """A read-only store: the one given (it must exist), else the default one when it exists."""
    if isinstance(store, ManifestStore):
        return store
    if store is not None:
        return ManifestStore(store, readonly=True)
    return ManifestStore(readonly=True) if default and default_store_path().is_file() else None


def verify_paths(paths: Iterable[str | os.PathLike], *, trust_anchors: str | os.PathLike | None = None,
                 allowed_list: str | os.PathLike | None = None, trust_config: str | os.PathLike | None = None,
                 store: ManifestStore | str | os.PathLike | None = None, default_store: bool = True,
                 on_result: Callable[[VerifyResult], None] | None = None,
                 skipped: list[Path] | None = None) -> list[VerifyResult]:
    """Verify files and folders offline. ``store``: a store (or its path) to look for stripped
    credentials in; None uses the default store when it exists (unless ``default_store`` is False).
    Files skipped in folders (types C2PA does not read) are appended to ``skipped``."""
    trust = load_settings(trust_anchors, allowed_list, trust_config)
    context = cc.reader_context(trust)
    files, skip = expand(paths)  # a missing path is an error before any file is verified
    if skipped is not None:
        skipped.extend(skip)
    st = open_store(store, default_store)
    own = not isinstance(store, ManifestStore)
    results = []
    try:
        methods = (st.methods() if st is not None else []) or list(UNSTORED_METHODS)
        for p in files:
            try:
                data = imaging.read_bytes_bounded(p)
            except OSError as e:
                r = VerifyResult(str(p), "none", problem=f"cannot read: {e.strerror or e}",
                                 reason="the file could not be read")
            except InputError as e:  # a padded image file, or one that vanished or is unreadable
                r = VerifyResult(str(p), "none", problem=str(e), reason="the file was not read")
            else:
                r = verify_bytes(data, name=str(p), context=context, store=st, methods=methods, trust=trust)
            results.append(r)
            if on_result is not None:
                on_result(r)
    finally:
        if own and st is not None:
            st.close()
    return results


def iter_lines(r: VerifyResult) -> Iterator[str]:
    """The human-readable report of one result (what ``diffaudit verify`` prints)."""
    c = r.credentials
    yield f"{r.path}: {r.conclusion}"
    state = cc.Credentials(r.status, trust=c.get("trust")).status_words
    if c.get("remote_manifest"):
        state = f"none (remote manifest, not fetched (offline): {c['remote_manifest']})"
    yield f"  manifest    {state}" + (f" [{r.format}]" if r.format else "")
    s = c.get("signer") or {}
    if s:
        yield (f"  signer      {s.get('common_name')} (issuer {s.get('issuer')}, {s.get('alg')}"
               + (f", timestamp {s['time']}" if s.get("time") else "") + ")")
    for m in c.get("manifests") or []:
        for key, when in (("failures", ""), ("recorded_failures", " when it was added")):
            if m.get(key):
                who = "this file" if m["role"] == "active" else f"ingredient {m.get('title')!r}"
                codes = ", ".join(f["code"] + (f" x{f['count']}" if f.get("count", 1) > 1 else "") for f in m[key])
                yield f"  failures    {who} ({m.get('label')}){when}: {codes}"
    g = c.get("generation") or {}
    known = [f"by {g['model']}" if g.get("model") else "", f"seed={g['seed']}" if g.get("seed") is not None else "",
             f"prompt={g['prompt']!r}" if g.get("prompt") else ""]
    if any(known):
        yield "  generated   " + " ".join(k for k in known if k)
    for ing in c.get("ingredients") or []:
        yield (f"  ingredient  {ing.get('title')} ({ing.get('relationship')})"
               + (f" sha256 {ing['sha256'][:16]}..." if ing.get("sha256") else ""))
    w = r.watermark
    if w:
        if w.get("detected"):
            yield (f"  watermark   {w.get('method')} payload={w.get('payload')} ({w.get('geometry', 'as is')}), CRC ok, "
                   f"{w.get('corrected_bits')} bit(s) corrected, false-positive bound "
                   f"{w.get('false_positive_bound_all', w.get('false_positive_bound', 0)):.1e}")
        else:
            yield f"  watermark   none found (tried {', '.join(w.get('tried') or [])})"
        if w.get("not_tried"):
            yield (f"  watermark   not tried: {', '.join(w['not_tried'])} (the store holds such stamps; its "
                   "weights are not configured here)")
    fp = r.fingerprint
    if fp:
        if fp.get("degenerate"):
            yield f"  fingerprint {fp['degenerate']}: never matched"
        elif fp.get("candidates"):
            for cand in fp["candidates"][:5]:
                yield (f"  candidate   {cand['manifest_label']} ({cand['role']}, image {cand.get('image_id')}): "
                       f"pixel ratio {cand['pixel_ratio']}" + (" qualifies" if cand["qualifies"] else ""))
            if fp.get("more_than_one"):
                yield "  candidates  more than one stored image qualifies"
        elif r.store:
            yield "  fingerprint no stored image shares it"
    rec = r.record
    if rec:
        now = rec.get("checked_now") or {}
        yield (f"  record      {rec['manifest_label']} ({rec['role']}, image {rec.get('image_id')}, run {rec.get('run')}): "
               f"{rec['recorded_at_stamp_time']['words']}"
               + (f"; checked now: {now.get('words')}" if now.get("words") else ""))
        gen = (rec.get("credentials") or {}).get("generation") or {}
        if gen.get("prompt") or gen.get("model"):
            yield f"  recorded    by {gen.get('model')} prompt={gen.get('prompt')!r}"
    yield f"  why         {r.reason}"
    if r.problem:
        yield f"  note        {r.problem}"
